"""edgeslm export / verify through the CLI on tiny Gemma 2 (window 8, softcaps 0.5 / 0.2), ONNX f32:
parity figures, bad input (exit 2, nothing written), tampering (exit 1), interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from subprocesses import sigint_default
from tiny_export import isolated_cache, tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--context", "128", "--prefill-chunk", "16"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgeslm.cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("export")
    isolated_cache(tmp, mp)
    folder = tiny_model_folder(tmp / "tiny-gemma2", "gemma2")
    out = tmp / "onnx-f32"
    done = run_cli("export", folder, "--target", "onnx", "--scheme", "f32", "--out", out, *TINY, "--json",
                   env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    yield {"tmp": tmp, "folder": folder, "out": out, "export": json.loads(done.stdout), "env": dict(os.environ)}
    mp.undo()


def largest_file(folder: Path) -> str:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return max(files, key=lambda name: files[name]["bytes"])


def test_export_writes_verified_manifest(setup):
    from edgeslm.targets.registry import get_target

    manifest = json.loads((setup["out"] / "manifest.json").read_text())
    assert manifest["target"] == "onnx" and manifest["scheme"] == "f32" and manifest["context_length"] == 128
    # self-contained: the model's config and tokenizer travel with the artifact
    files = set(manifest["files"])
    assert files >= {get_target("onnx").artifact_suffix, "config.json"}
    assert "tokenizer.json" in files or "tokenizer/tokenizer.json" in files
    assert manifest["tools"]["onnxruntime"] and manifest["reference"] == str(setup["folder"].resolve())
    parity = manifest["parity"]
    assert parity["passed"] and parity["steps"] >= 64 and parity["prompt_tokens"] > 8  # past the window of 8
    assert parity["max_abs_logit_diff"] < 1e-4
    assert parity["greedy_disagree"] == 0 and parity["greedy_agree"] + parity["greedy_ties"] == parity["steps"]
    assert abs(parity["ppl_rel_diff"]) < 1e-4  # fp32 through onnxruntime: the same function


def test_verify_cli_json_and_table(setup):
    done = run_cli("verify", setup["out"], "--json", env=setup["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["passed"] and r["hashes_checked"] == len(json.loads((setup["out"] / "manifest.json").read_text())["files"])
    assert r["max_abs_logit_diff"] < 1e-4 and r["sliding_window"] == 8
    table = run_cli("verify", setup["out"], "--steps", "30", env=setup["env"])
    assert table.returncode == 0 and "PASS" in table.stdout and "greedy tokens (30 steps" in table.stdout


def test_verify_refuses_steps_that_cannot_work(setup):
    for steps, message in (("0", "at least 1"), ("200", "--context at least")):
        done = run_cli("verify", setup["out"], "--steps", steps, env=setup["env"])
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_tampered_file_fails_hash_check(setup, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(setup["out"], copy)
    name = largest_file(copy)
    with open(copy / name, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    done = run_cli("verify", copy, env=setup["env"])
    assert done.returncode == 1 and f"{name}: sha256 differs" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_parity_failure_exits_1(setup, tmp_path):
    """Weights changed *and* hashes re-written: the hash check passes, the parity bound must not."""
    import shutil

    import numpy as np

    from edgeslm.artifact import write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(setup["out"], copy)
    name = largest_file(copy)  # the f32 weights
    data = np.fromfile(copy / name, dtype=np.uint8)
    data[: data.size // 2 // 4 * 4].view(np.float32)[::7] *= 1.05  # 5% on every 7th weight of the first half
    data.tofile(copy / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "format", "created", "tools")})
    done = run_cli("verify", copy, "--json", env=setup["env"])
    assert done.returncode == 1
    r = json.loads(done.stdout)
    assert not r["passed"] and any("logit diff" in f for f in r["failures"])


@pytest.mark.parametrize("args,message", [
    (["--target", "nosuch", "--scheme", "f32"], "unknown target"),
    (["--target", "onnx", "--scheme", "q3"], "unknown scheme"),
    (["--target", "onnx", "--scheme", "q3a"], "unknown scheme"),
])
def test_bad_input_exit_2_and_nothing_written(setup, tmp_path, args, message):
    out = tmp_path / "art"
    done = run_cli("export", setup["folder"], *args, "--out", out, *TINY, env=setup["env"])
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force(setup, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli("export", setup["folder"], "--target", "onnx", "--out", out, *TINY, env=setup["env"])
    assert done.returncode == 2 and "--force" in done.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_verify_bad_folder(tmp_path):
    done = run_cli("verify", tmp_path)
    assert done.returncode == 2 and "not an edgeslm artifact" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_export_leaves_nothing(setup, tmp_path, sig):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "edgeslm.cli.main", "export", str(setup["folder"]), "--target",
                             "onnx", "--out", str(out), *TINY], cwd=ROOT, env=setup["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".art.tmp-*")):  # the export has started writing
        assert proc.poll() is None, proc.communicate()[1][-1000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)  # as soon as it writes: tracing, writing and verifying are still ahead
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1000:]
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # no artifact, no temporary sibling
