"""The one table of targets: name -> module path of a Target subclass instance `TARGET`."""

from __future__ import annotations

import importlib

from edgeslm.errors import EdgeSLMError

TARGETS = {
    "onnx": "edgeslm.targets.onnx",
    "executorch": "edgeslm.targets.executorch",
    "coreml": "edgeslm.targets.coreml",
    "webgpu": "edgeslm.targets.webgpu",
    "gguf": "edgeslm.targets.gguf",
}


def get_target(name: str):
    if name not in TARGETS:
        known = ", ".join(TARGETS) or "none yet"
        raise EdgeSLMError(f"unknown target {name!r}; known: {known}")
    return importlib.import_module(TARGETS[name]).TARGET


def all_targets():
    return [get_target(n) for n in TARGETS]
