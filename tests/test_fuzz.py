"""Seeded fuzzing of every input a verb reads, through the functions the verbs call, in-process:
each mutated input must load, or be refused with one EdgeSLMError line. Never another exception, a
hang or a huge allocation. A sample goes through the CLI itself. The counts are printed at the end
of the test session (conftest.py)."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_export import tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261201
FUZZ_COUNTS: dict[str, dict[str, int]] = {}  # class -> {"accepted": n, "refused": n}; read by conftest.py

WEIRD = [0, -1, -7, 1, 2, 3, 10**12, 2**63, 1.5, -0.5, float("nan"), float("inf"), "", "x", "512", None, True,
         [], [1, 2], {}, {"a": 1}]


def outcome(kind: str, fn, *args):
    """Runs fn; records accepted / refused (EdgeSLMError); any other exception fails the test."""
    from edgeslm.errors import EdgeSLMError

    counts = FUZZ_COUNTS.setdefault(kind, {"accepted": 0, "refused": 0})
    try:
        fn(*args)
    except EdgeSLMError as e:
        assert "\n" not in str(e).strip(), f"{kind}: a multi-line error: {e}"
        counts["refused"] += 1
        return "refused"
    counts["accepted"] += 1
    return "accepted"


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # truncation
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:  # random bytes in the first 256 (headers)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(256, len(data)))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:  # non-UTF-8 bytes
        data[rng.randrange(len(data))] = 0xFF
        return bytes(data)
    return bytes(data[: rng.randrange(len(data))]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return tiny_model_folder(root / "tiny", "llama")


def test_config_json(tiny, tmp_path):
    from edgeslm.loading import load_model

    rng = random.Random(SEED)
    base = json.loads((tiny / "config.json").read_text())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny / "model.safetensors")
    for i in range(400):
        if i % 4 == 3:
            text = mutate_bytes(rng, (tiny / "config.json").read_bytes())
        else:
            cfg = dict(base)
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(sorted(cfg) + ["model_type", "sliding_window", "head_dim", "layer_types"])
                cfg[key] = rng.choice(WEIRD + [rng.choice(["gemma2", "mistral", "bert", "llama"])])
            text = json.dumps(cfg).encode()
        (folder / "config.json").write_bytes(text)
        outcome("config.json", load_model, folder, None, False, False)


def test_safetensors(tiny, tmp_path):
    from edgeslm.loading import load_model

    rng = random.Random(SEED + 1)
    data = (tiny / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny / "config.json").read_bytes())
    for i in range(300):
        kind = i % 3
        if kind == 0:
            blob = mutate_bytes(rng, data)
        else:
            h = json.loads(json.dumps(header))
            name = rng.choice([k for k in h if k != "__metadata__"])
            entry = h[name]
            choice = rng.randrange(5)
            if choice == 0:  # overlapping or out-of-range offsets
                entry["data_offsets"] = [rng.randrange(len(data) * 2), rng.randrange(len(data) * 2)]
            elif choice == 1:  # a dtype that disagrees
                entry["dtype"] = rng.choice(["F16", "I8", "U8", "BOOL", "F64", "XX"])
            elif choice == 2:  # a shape that disagrees with config.json, or a 10^12-element one
                entry["shape"] = rng.choice([[10**6, 10**6], [1], [], [64, 3], list(reversed(entry["shape"]))])
            elif choice == 3:
                h.pop(name)
            else:
                entry["shape"] = [-1, 5]
            raw = json.dumps(h).encode()
            length = len(raw) if kind == 1 else rng.choice([len(raw), 10**9, len(data) * 4, 0])
            blob = struct.pack("<Q", length) + raw + data[8 + header_len :]
        (folder / "model.safetensors").write_bytes(blob)
        outcome("safetensors", load_model, folder, None, False, False)


def test_gguf_header_and_metadata(tmp_path):
    import gguf
    import numpy as np

    from edgeslm.loading import check_gguf_header

    rng = random.Random(SEED + 2)
    good = tmp_path / "good.gguf"
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    for _ in range(200):
        bad.write_bytes(mutate_bytes(rng, data))
        outcome("gguf", check_gguf_header, bad)


def test_recipes(tmp_path):
    from edgeslm.pipeline import check_recipe, read_recipe

    rng = random.Random(SEED + 3)
    keys = ["model", "scheme", "targets", "devices", "budget", "context", "allow_estimates", "finetune", "nosuch"]
    values = ['"x"', "3", "-1", "0", "nan", "inf", "[]", '["onnx"]', "[1, 2]", "true", '"512"', "{}",
              '{data = "d.txt", steps = "ten"}', '{data = "d.txt", steps = 2}', '{data = "d.txt", warmup = 1}',
              "{steps = 1}", '{data = "d.txt", lr = -1}', '{data = "d.txt", targets = "q_proj"}']
    path = tmp_path / "recipe.toml"
    for i in range(200):
        lines = [f"{rng.choice(keys)} = {rng.choice(values)}" for _ in range(rng.randint(1, 3))]
        text = "\n".join(lines).encode()
        if i % 5 == 4:
            text = mutate_bytes(rng, text + b"\n")
        path.write_bytes(text)
        outcome("recipe", lambda p: check_recipe(read_recipe(p)), path)


def test_budgets_and_profiles(tmp_path):
    from edgeslm.devices import get_profile, load_budget_file

    rng = random.Random(SEED + 4)
    keys = ["prompt_tokens", "ttft_ms", "decode_tok_s", "peak_memory_mb", "artifact_mb", "latency"]
    values = ["1", "0", "-5", "nan", "inf", "-inf", "1e400", '"fast"', "true", "[1]", "2.5"]
    budget = tmp_path / "b.toml"
    for i in range(200):
        lines = [f"{rng.choice(keys)} = {rng.choice(values)}" for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            lines += ["[device.pixel-8]", f"{rng.choice(keys)} = {rng.choice(values)}"]
        text = "\n".join(lines).encode()
        if i % 5 == 4:
            text = mutate_bytes(rng, text + b"\n")
        budget.write_bytes(text)
        outcome("budget", load_budget_file, budget)
    shipped = (ROOT / "edgeslm" / "devices" / "pixel-8.toml").read_text()
    profile = tmp_path / "phone.toml"
    for i in range(200):
        lines = shipped.splitlines()
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(lines))
            if "=" in lines[j] and not lines[j].startswith(" "):
                lines[j] = f"{lines[j].split('=')[0].strip()} = {rng.choice(values)}"
            else:
                lines.pop(j)
        text = "\n".join(lines).encode()
        if i % 5 == 4:
            text = mutate_bytes(rng, text)
        profile.write_bytes(text)
        outcome("device profile", get_profile, str(profile))


def test_a_sample_through_the_cli(tiny, tmp_path):
    """The same classes through the real command line: exit 0, or exit 2 with one line."""
    rng = random.Random(SEED + 5)
    base = json.loads((tiny / "config.json").read_text())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny / "model.safetensors")
    for i in range(6):
        cfg = dict(base)
        cfg[rng.choice(sorted(cfg))] = rng.choice(WEIRD)
        text = json.dumps(cfg).encode() if i % 2 else mutate_bytes(rng, json.dumps(cfg).encode())
        (folder / "config.json").write_bytes(text)
        done = subprocess.run([sys.executable, "-m", "edgeslm.cli.main", "info", str(folder), "--json"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        counts = FUZZ_COUNTS.setdefault("cli: edgeslm info", {"accepted": 0, "refused": 0})
        if done.returncode == 0:
            json.loads(done.stdout)
            counts["accepted"] += 1
        else:
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
            assert len([ln for ln in done.stderr.splitlines() if "error" in ln]) == 1, done.stderr
            counts["refused"] += 1
