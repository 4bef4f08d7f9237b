"""Bad input: one clear line on stderr, exit code 2, no traceback."""

import json
import subprocess
import sys

import pytest
import torch

from tiny import tiny_pair

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]


def run_cli(*args, timeout=300):
    return subprocess.run(EDGESLM + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done, *needles):
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from safetensors.torch import save_file

    hf, _ = tiny_pair("llama")
    folder = tmp_path_factory.mktemp("tiny")
    hf.config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors")
    return folder


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "nope"), "no such model path")


def test_truncated_safetensors(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    data = (tiny_folder / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("info", bad), "not a valid safetensors file")


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    assert_one_line_error(run_cli("info", bad), "corrupt GGUF header")
    worse = tmp_path / "worse.gguf"
    worse.write_bytes(b"NOPE" + b"\x00" * 64)
    assert_one_line_error(run_cli("info", worse), "not a GGUF file")


def test_unknown_architecture(tiny_folder, tmp_path):
    bad = tmp_path / "arch"
    bad.mkdir()
    config = json.loads((tiny_folder / "config.json").read_text())
    config["model_type"] = "mamba_unheard_of"
    (bad / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("info", bad), "unsupported architecture")
    # known to transformers but not to our decoder
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("info", bad), "unsupported architecture 'gpt2'")


def test_pickle_needs_opt_in(tiny_folder, tmp_path):
    pick = tmp_path / "pickle"
    pick.mkdir()
    (pick / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(tiny_folder / "model.safetensors"), pick / "pytorch_model.bin")
    assert_one_line_error(run_cli("info", pick), "pickle", "--allow-pickle")
    done = run_cli("info", pick, "--allow-pickle", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["family"] == "llama"


def test_info_json_on_tiny(tiny_folder):
    done = run_cli("info", tiny_folder, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["layers"] == 4 and info["kv_heads"] == 2
    assert info["parameters"] == sum(p.numel() for p in tiny_pair("llama")[1].parameters())
