"""The kernel tests run Triton's interpreter on CPU tensors where there is no GPU, and the real
compiled kernels on CUDA tensors where there is one (the same tests, see DEVICE in each file).

TRITON_INTERPRET must be set before a @triton.jit function is decorated, i.e. before the kernel
modules are imported. If another test module imported them first (edgeslm.schemes.int4 imports
int4_matmul), they are reloaded here so their kernels are decorated as interpreted functions.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("edgeslm.kernels.softcap_attention", "edgeslm.kernels.int4_matmul"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])
