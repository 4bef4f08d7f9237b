"""The TVM web runtime (wasm_runtime.bc, tvmjs_support.bc, webgpu_runtime.bc), built once and cached.

The apache-tvm 0.27 wheel ships the runtime's C++ sources (tvm/src/runtime, tvm/web/emcc) and
tvm-ffi ships its own (tvm_ffi/src), but several support headers those sources include are not
in either wheel. edgeslm writes its own minimal versions (targets/webgpu/tvm_headers/, our code,
not copies) and compiles the three bitcode files with Debian's emscripten into
~/.cache/edgeslm/tvm-web/<digest>/. Linking a model (build.py) then needs only these files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from edgeslm.errors import EdgeSLMError
from edgeslm.loading import cache_dir

HEADERS = Path(__file__).parent / "tvm_headers"
PARTS = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")
EMSCRIPTEN_HINT = "apt-get install -y emscripten (or run scripts/setup.sh)"


def emcc_path() -> str:
    path = shutil.which("emcc")
    if path is None:
        raise EdgeSLMError(f"emscripten (emcc) is not installed; the webgpu target links with it: {EMSCRIPTEN_HINT}")
    return path


def _wheel_roots() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    return Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent


def _digest() -> str:
    h = hashlib.sha256()
    for name in ("apache-tvm", "apache-tvm-ffi"):
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            pass
    for p in sorted(HEADERS.rglob("*.h")):
        h.update(p.relative_to(HEADERS).as_posix().encode() + p.read_bytes())
    try:
        h.update(subprocess.run(["emcc", "--version"], capture_output=True, text=True).stdout.encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def web_cache() -> Path:
    return Path(os.environ.get("EDGESLM_TVM_WEB", cache_dir() / "tvm-web"))


def runtime_home() -> Path:
    """A TVM_HOME for tvm.contrib.tvmjs: it looks for web/dist/wasm/*.bc under it."""
    return web_cache() / _digest()


def runtime_dir() -> Path:
    return runtime_home() / "web" / "dist" / "wasm"


def runtime_libs(progress: bool = True) -> list[Path]:
    """The three .bc files, building them first if this machine has not yet (about 3 minutes)."""
    out = runtime_dir()
    libs = [out / f"{p}.bc" for p in PARTS]
    if all(p.is_file() for p in libs):
        return libs
    emcc = emcc_path()
    tvm_root, ffi_root = _wheel_roots()
    web_cache().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=web_cache(), prefix=".build-"))
    try:
        root = tmp / "tvm"
        # Copies, not links: the sources reach headers through relative "../../" paths, which the
        # compiler resolves from the file's real location.
        shutil.copytree(tvm_root / "src" / "runtime", root / "src" / "runtime")
        shutil.copytree(tvm_root / "web" / "emcc", root / "web" / "emcc", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(tvm_root / "include", root / "include")
        shutil.copytree(ffi_root / "src", root / "3rdparty" / "tvm-ffi" / "src")
        shutil.copytree(ffi_root / "include", root / "3rdparty" / "tvm-ffi" / "include")
        shutil.copytree(ffi_root / "3rdparty" / "dlpack", root / "3rdparty" / "tvm-ffi" / "3rdparty" / "dlpack")
        shutil.copytree(HEADERS, root, dirs_exist_ok=True)  # our own support headers on top
        inc = [root, root / "include", root / "3rdparty/tvm-ffi/include",
               root / "3rdparty/tvm-ffi/3rdparty/dlpack/include", root / "3rdparty/compiler-rt"]
        flags = [f"-I{p}" for p in inc] + ["-O3", "-std=c++17", "-Wno-ignored-attributes"]
        from tqdm import tqdm

        for part in tqdm(PARTS, desc="building the TVM web runtime (once)", disable=not progress):
            cmd = [emcc, *flags, "-emit-llvm", "-c", "-o", str(tmp / f"{part}.bc"), str(root / "web/emcc" / f"{part}.cc")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise EdgeSLMError(f"building the TVM web runtime failed on {part}.cc: {r.stderr.strip()[-2000:]}")
        out.mkdir(parents=True, exist_ok=True)
        for part in PARTS:
            os.replace(tmp / f"{part}.bc", out / f"{part}.bc")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs
