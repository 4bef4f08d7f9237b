"""Compiles the kernels for sm_90 (H100) with Triton's bundled toolchain, no GPU needed, at the
tile configurations the launchers pick on CUDA, and reports registers and spill stack per kernel.

The interpreter checks what the kernels compute; this checks that they compile for the real
target and fit its registers. Run without TRITON_INTERPRET (test_compile_sm90.py starts it as a
subprocess with --quick). Prints one JSON line per configuration.

Arguments are typed as a JIT launch on contiguous tensors would specialize them: unit strides
become constants, pointers and the other strides are 16-divisible.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from edgeslm.kernels import int4_matmul as im
from edgeslm.kernels import softcap_attention as sa

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_one(fn, types: dict, consts: dict, unit_strides, num_warps, num_stages):
    names = fn.arg_names
    consts = dict(consts, **{n: 1 for n in unit_strides})
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts and sig[n] != "fp32"}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for item in next(x for x in usage.splitlines() if "REG:" in x).split() if ":" in item)
    return dict(kernel=fn.__name__, consts={k: v for k, v in consts.items() if k.isupper()}, num_warps=num_warps,
                registers=int(fields["REG"]), spill_stack=int(fields["STACK"]), shared=kernel.metadata.shared)


def attention_configs(dtypes):
    for dtype in dtypes:
        dt = TRITON_DTYPE[dtype]
        for head_dim in (64, 128, 256):
            for decode in (False, True):
                bm, bn, nw, ns = sa.gpu_config(head_dim, dtype, decode)
                types = dict(Q="*" + dt, K="*" + dt, V="*" + dt, OUT="*fp32" if decode else "*" + dt, QPOS="*i64",
                             KPOS="*i64", LSE="*fp32", STATS="*i32", BLIST="*i32", BCOUNT="*i32", qk_scale="fp32",
                             softcap="fp32")
                consts = dict(GROUP=2, HEAD_DIM=head_dim, D=head_dim, BLOCK_M=bm, BLOCK_N=bn, HAS_SOFTCAP=True,
                              HAS_WINDOW=True, SPLIT=decode, BLOCK_LIST=not decode, COUNT_BLOCKS=False,
                              DOT_MODE=sa.dot_mode(dtype))
                yield sa._attn_fwd_kernel, types, consts, ("sqd", "skd", "svd", "sod"), nw, ns
    for head_dim in (64, 128, 256):
        yield (sa._attn_combine_kernel, dict(PART="*fp32", LSE="*fp32", OUT="*bf16"), dict(HEAD_DIM=head_dim, D=head_dim),
               ("sod",), 1 if head_dim <= 128 else 2, 1)


def int4_configs(dtypes, groups):
    for dtype in dtypes:
        dt = TRITON_DTYPE[dtype]
        for group in groups:
            for zeros in (False, True):
                for m in (1, 1024):
                    bm, bn, bk, nw, ns = im.gpu_config(m, dtype)
                    split = m <= 16
                    types = dict(X="*" + dt, Y="*fp32" if split else "*" + dt, QW="*u8", SC="*fp16", ZP="*u8")
                    consts = dict(GROUP=group, HAS_ZEROS=zeros, SPLIT_K=2 if split else 1, BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk, DOT_MODE=im._dot_mode(dtype))
                    yield im._int4_mm_kernel, types, consts, ("sxk", "syn"), nw, ns
                    bm, bn, bk, nw, ns = im.gpu_config(m, dtype, backward=True)
                    types = dict(DY="*" + dt, DX="*" + dt, QW="*u8", SC="*fp16", ZP="*u8")
                    consts = dict(GROUP=group, HAS_ZEROS=zeros, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                  DOT_MODE=im._dot_mode(dtype))
                    yield im._int4_mm_dx_kernel, types, consts, ("sdyn", "sdxk"), nw, ns


def main():
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    quick = "--quick" in sys.argv  # the CI test: bf16 (fp16 uses the same tiles), group 32
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    configs = [*attention_configs(dtypes), *int4_configs(dtypes, (32,) if quick else (32, 128))]
    seen = set()
    for fn, types, consts, units, nw, ns in configs:
        key = (fn.__name__, tuple(sorted(types.items())), tuple(sorted(consts.items())), nw, ns)
        if key not in seen:
            seen.add(key)
            print(json.dumps(compile_one(fn, types, consts, units, nw, ns)), flush=True)


if __name__ == "__main__":
    main()
