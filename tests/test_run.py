"""`edgeslm run` on tiny f32 artifacts, each in its own runtime: the generated tokens are the reference
decoder's greedy tokens, the text is their decoding, the folder runs after being copied elsewhere
(with the original and its reference gone), --chat applies the chat template, a prompt longer than the
context is refused before the runtime loads, and Ctrl-C ends the stream with exit code 130 alone."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import termios
import time

import pytest
import torch

from subprocesses import sigint_default
from tiny_export import char_tokenizer, isolated_cache, tiny_model_folder

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]
PROMPT = "The weather today"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def edgeslm(*args, timeout=300):
    return subprocess.run(EDGESLM + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def reference_tokens(folder, prompt_ids: list[int], steps: int, context: int) -> list[int]:
    from edgeslm.loading import load_model
    from edgeslm.model import generate_greedy
    from edgeslm.ops import reference_only

    model, _, _ = load_model(folder, with_tokenizer=False)
    with reference_only(), torch.no_grad():
        tokens, _ = generate_greedy(model, torch.tensor([prompt_ids]), steps, max_len=context)
    return tokens[0].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("run")
    isolated_cache(tmp, mp)
    folder = tiny_model_folder(tmp / "tiny-llama", "llama")
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    yield tmp, folder
    mp.undo()


def export(tmp, folder, target, context, name=None):
    from edgeslm.exporter import export_artifact

    out = tmp / (name or f"{target}-{context}")
    if not out.exists():
        export_artifact(folder, target, "f32", out, context=context, prefill_chunk=16, verify=False, progress=False)
    return out


def check_against_reference(folder, artifact, max_tokens=20, context=64, tok=None):
    done = edgeslm("run", artifact, "--prompt", PROMPT, "--max-tokens", max_tokens, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)  # --json: stdout is the one JSON object
    tok = tok or char_tokenizer()
    ids = tok(PROMPT).input_ids
    assert r["prompt_tokens"] == len(ids) and r["generated_tokens"] == max_tokens and r["stopped"] == "max_tokens"
    assert r["tokens"] == reference_tokens(folder, ids, max_tokens, context)  # f32: greedy tokens identical
    assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
    assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["tok_s"] > 0
    return r


def test_onnx_streams_reference_tokens_from_a_copied_folder(tiny, tmp_path):
    tmp, folder = tiny
    original = export(tmp, folder, "onnx", 64, name="onnx-to-copy")
    copied = tmp_path / "elsewhere" / "artifact"
    shutil.copytree(original, copied)
    shutil.rmtree(original)  # neither the original folder...
    hidden = tmp_path / "hidden-model"
    shutil.copytree(folder, hidden)
    shutil.rmtree(folder)  # ...nor the reference folder the manifest names is needed
    try:
        r = check_against_reference(hidden, copied)
        assert r["runtime"].startswith("onnxruntime") and r["target"] == "onnx"
        # without --json the text streams to stdout and the figures go to stderr
        done = edgeslm("run", copied, "--prompt", PROMPT, "--max-tokens", 20)
        assert done.returncode == 0, done.stderr
        assert done.stdout.rstrip("\n") == r["text"]
        assert "tok/s" in done.stderr and "20 tokens" in done.stderr
    finally:
        shutil.copytree(hidden, folder)


def test_executorch_streams_reference_tokens(tiny):
    tmp, folder = tiny
    r = check_against_reference(folder, export(tmp, folder, "executorch", 64))
    assert r["runtime"].startswith("executorch")


def byte_level_tokenizer():
    """GPT-2 style byte-level BPE: the 256 byte symbols and four merges (260 ids), the kind of
    tokenizer the gguf target maps."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("T", "h"), ("h", "e"), ("\u0120", "t"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_gguf_streams_reference_tokens(tiny):
    from tiny import tiny_pair

    from edgeslm.targets.gguf import llama_cpp_python

    tmp, _ = tiny
    folder = tmp / "tiny-llama-bytes"
    if not folder.exists():
        hf, _ = tiny_pair("llama", vocab_size=260)
        hf.save_pretrained(str(folder), safe_serialization=True)
        byte_level_tokenizer().save_pretrained(str(folder))
    artifact = export(tmp, folder, "gguf", 64)  # export needs only the gguf package
    if llama_cpp_python() is None:
        pytest.skip("llama.cpp (llama-cpp-python) is not installed here: bash scripts/setup.sh builds it")
    r = check_against_reference(folder, artifact, tok=byte_level_tokenizer())
    assert r["runtime"].startswith("llama.cpp")


def test_chat_template_and_context_limit(tiny):
    tmp, folder = tiny
    artifact = export(tmp, folder, "onnx", 64)
    done = edgeslm("run", artifact, "--prompt", "hi", "--max-tokens", 5, "--chat", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    ids = char_tokenizer()("<user>hi\n<assistant>", add_special_tokens=False).input_ids
    assert r["chat"] and r["prompt_tokens"] == len(ids)
    assert r["tokens"] == reference_tokens(folder, ids, 5, 64)
    # generation stops at the artifact's context
    long_prompt = "x" * 60
    done = edgeslm("run", artifact, "--prompt", long_prompt, "--max-tokens", 50, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["stopped"] == "context" and r["generated_tokens"] == 4


def test_prompt_longer_than_context_is_refused_before_the_runtime(tiny, tmp_path):
    tmp, folder = tiny
    broken = tmp_path / "broken"
    shutil.copytree(export(tmp, folder, "onnx", 64), broken)
    for f in broken.rglob("*"):  # every model file garbled: loading the runtime would fail, with another message
        rel = f.relative_to(broken).as_posix()
        if f.is_file() and not rel.startswith("tokenizer") and f.suffix not in (".json", ".txt", ".jinja"):
            f.write_bytes(b"not a model")
    done = edgeslm("run", broken, "--prompt", "y" * 64)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "context is 64" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    for args, needle in ((["--prompt", ""], "prompt is empty"), (["--prompt", "a", "--max-tokens", "0"], "at least 1"),
                         (["--prompt", "a", "--chat"], None)):
        done = edgeslm("run", export(tmp, folder, "onnx", 64), *args)
        if needle is None:  # this tokenizer has a chat template: --chat is fine
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = edgeslm("run", tmp_path / "nowhere", "--prompt", "a")
    assert done.returncode == 2 and "not a folder" in done.stderr


def test_ctrl_c_stops_cleanly(tiny):
    """SIGINT mid-stream: exit 130, nothing on stderr. The generation writes far more text than the
    one-page pipe it writes into holds (16,000 tokens: even if most decode to nothing, e.g. [UNK],
    more than 4 KiB), and the test reads nothing until after the signal, so the process is still
    generating (or blocked writing) when the signal arrives, however slowly the test is scheduled."""
    tmp, folder = tiny
    artifact = export(tmp, folder, "onnx", 16384)
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(EDGESLM + ["run", str(artifact), "--prompt", PROMPT, "--max-tokens", "16000"],
                            stdout=write_end, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    os.close(write_end)
    try:
        deadline = time.time() + 120
        pending = bytearray(4)
        while time.time() < deadline:
            fcntl.ioctl(read_end, termios.FIONREAD, pending)
            if int.from_bytes(pending, sys.byteorder) > 0:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as f:
            streamed = f.read()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 130, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.strip() == "", err  # no traceback, no figures, no message
    assert 0 < len(streamed) < 2 * 16000  # it stopped before the end
