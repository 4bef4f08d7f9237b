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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_key(*parts) -> str:
    """A cache key over the contents of files and folders (Path parts: every file below a folder, by
    relative name) and plain values (any other part, strings included), plus the versions of edgeslm
    and the tools it drives: change any input or any tool and the key changes."""
    h = hashlib.sha256(json.dumps(tool_versions(), sort_keys=True).encode())
    for part in parts:
        path = part if isinstance(part, Path) else None
        if path is not None and path.is_file():
            h.update(f"file:{sha256_file(path)}".encode())
        elif path is not None and path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path).as_posix()}:{sha256_file(f)}".encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"|")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(parent: Path, name: str):
    """Temporary folders of this name left by a process that no longer runs (kill -9, power loss)."""
    for old in parent.glob(f".{name}.tmp-*"):
        pid = old.name[len(f".{name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yields a temporary folder; on success it becomes `out` (replacing it only with force).

    One writer per `out` at a time: a second one exits with an error rather than racing the rename
    (an advisory lock, kept in the system's temporary folder so that nothing appears beside `out`). A full disk or an unwritable parent is one clear error,
    and the temporary folder is removed on any failure; one orphaned by a killed process is removed
    by the next run."""
    import errno
    import fcntl

    out = Path(out)
    if out.exists() and not force:
        raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        locks = Path(tempfile.gettempdir()) / "edgeslm-locks"
        locks.mkdir(exist_ok=True)
        lock = open(locks / (hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32] + ".lock"), "w")
    except OSError as e:
        raise EdgeSLMError(f"cannot write {out}: {e.strerror or e}") from None
    tmp = None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgeSLMError(f"another edgeslm process is writing {out}; wait for it or choose another --out") from None
        if out.exists() and not force:  # the other writer finished while we waited for nothing
            raise EdgeSLMError(f"{out} already exists; pass --force to replace it")
        _remove_stale_temporaries(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
        with _sigterm_as_interrupt():
            try:
                yield tmp
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                    raise EdgeSLMError(f"cannot write {out}: {e.strerror} (nothing was written)") from None
                raise
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.close()  # the lock file stays: unlinking it would let two later writers lock two files


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
