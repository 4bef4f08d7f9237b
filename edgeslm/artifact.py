"""Artifact folders: atomic creation and manifest.json with a sha256 per file.

An export writes into a hidden temporary sibling of the output folder and renames it into place
only when everything (files and manifest) is written. An error, Ctrl-C or SIGTERM removes the
temporary folder; even a SIGKILL leaves only a hidden `.NAME.tmp-*` sibling, never a folder under
the requested name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import CheckFailed, EdgeSLMError

MANIFEST = "manifest.json"
FORMAT = "edgeslm-artifact/1"
TOOLS = ("edgeslm", "torch", "transformers", "onnx", "onnxruntime", "executorch", "torchao", "coremltools",
         "apache-tvm", "gguf", "triton", "peft")


def tool_versions(names=TOOLS) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """So that `kill PID` unwinds through the cleanup below like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yields a temporary folder; on success it becomes `out` (replacing it only with force)."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with _sigterm_as_interrupt():
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, fields: dict) -> dict:
    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tools": tool_versions(),
        **fields,
        "files": file_table(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EdgeSLMError(f"{folder} is not an edgeslm artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeSLMError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise EdgeSLMError(f"{path} is not an {FORMAT} manifest")
    return manifest


def check_hashes(folder: Path, manifest: dict) -> list[str]:
    """Returns the problems (missing or changed files); empty when every hash matches."""
    problems = []
    for rel, info in manifest["files"].items():
        p = Path(folder) / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def require_hashes(folder: Path, manifest: dict):
    problems = check_hashes(folder, manifest)
    if problems:
        raise CheckFailed(f"{folder}: {len(problems)} file(s) fail the manifest: {'; '.join(problems[:3])}")
