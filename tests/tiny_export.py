"""Tiny model folders for the export/verify tests: a tiny_pair decoder saved as a Hugging Face folder
with a character-level tokenizer (97 ids, the tiny vocab), so Brown perplexity runs on it too."""

from __future__ import annotations

import string
from pathlib import Path

from tiny import tiny_pair


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["[UNK]", "\n"] + [c for c in string.printable if 32 <= ord(c) < 127]
    vocab = {c: i for i, c in enumerate(chars)}
    assert len(vocab) == 97
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def tiny_model_folder(folder: Path, family: str = "gemma2", seed: int = 0, **overrides) -> Path:
    """Writes config.json + model.safetensors + tokenizer files of tiny_pair(family) into folder."""
    hf, _ = tiny_pair(family, seed=seed, **overrides)
    folder = Path(folder)
    hf.save_pretrained(str(folder), safe_serialization=True)
    char_tokenizer().save_pretrained(str(folder))
    return folder


def isolated_cache(tmp: Path, monkeypatch) -> Path:
    """Points EDGESLM_CACHE at tmp (quantized tiny references land there), keeping the Brown corpus."""
    from edgeslm.data import brown_dir

    brown = brown_dir()  # in the real cache, where the set-up installed it
    cache = Path(tmp) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / brown.name).symlink_to(brown)
    monkeypatch.setenv("EDGESLM_CACHE", str(cache))
    return cache


def assert_exports_and_verifies(folder: Path, out: Path, target: str, scheme: str):
    """`edgeslm.export` of folder passes its parity check in target's runtime, and `edgeslm.verify`
    passes on the artifact (skipped where the target's runtime is not installed)."""
    import pytest

    import edgeslm
    from edgeslm.targets.registry import get_target

    reason = get_target(target).unavailable_reason()
    if reason:
        pytest.skip(reason)
    art = edgeslm.export(folder, target=target, scheme=scheme, out=out, context=128, progress=False)
    assert art.passed is True
    assert edgeslm.verify(art, progress=False).passed is True
    return art
