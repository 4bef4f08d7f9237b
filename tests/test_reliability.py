"""What a build pipeline relies on: defaults that work, every MODEL kind in every verb, exit codes
that mean one thing, artifacts that stand alone, and faults (kill -9, two writers, a full disk) that
leave nothing half-written. Tiny models, real runtimes (onnxruntime), no mocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_export import isolated_cache, tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--context", "128", "--prefill-chunk", "16"]


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeslm.cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(done, code=2):
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(("W1201", "WARNING"))]
    errors = [ln for ln in lines if "error" in ln]
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("reliability")
    isolated_cache(tmp, mp)
    yield {"tmp": tmp, "env": dict(os.environ), "llama": tiny_model_folder(tmp / "tiny-llama", "llama")}
    mp.undo()


def test_default_export_verifies_past_a_512_window(env):
    """A Gemma 2 with a real-size window (512) exports with default options: the context grows to
    cover the window, and verify prefills past it before decoding further past it."""
    from edgeslm.exporter import export_artifact

    folder = tiny_model_folder(env["tmp"] / "gemma2-w512", "gemma2", sliding_window=512,
                               max_position_embeddings=4096, final_logit_softcapping=None)
    manifest = export_artifact(folder, "onnx", "f32", env["tmp"] / "w512", progress=False)
    parity = manifest["parity"]
    assert manifest["context_length"] == 1024
    assert parity["passed"], parity["failures"]
    assert parity["sliding_window"] == 512 and parity["prompt_tokens"] > 512
    assert parity["prompt_tokens"] + parity["steps"] <= 1024


def test_settings_that_cannot_work_are_refused_before_any_work(env, tmp_path):
    folder = tiny_model_folder(tmp_path / "gemma2-w512", "gemma2", sliding_window=512, max_position_embeddings=4096)
    started = time.perf_counter()
    done = run_cli("export", folder, "--target", "onnx", "--out", tmp_path / "o", "--context", "512", env=env["env"])
    assert "--context" in one_line_error(done)
    assert time.perf_counter() - started < 60 and not (tmp_path / "o").exists()


def test_info_and_eval_take_a_quantized_checkpoint(env, tmp_path, capsys):
    from edgeslm.cli.main import main

    q = tmp_path / "q"
    assert main(["quantize", str(env["llama"]), "--scheme", "q4g32-rtn", "--out", str(q), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(q), "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["info", str(env["llama"]), "--json"]) == 0
    float_model = json.loads(capsys.readouterr().out)
    assert quantized["parameters"] == float_model["parameters"] > 0
    assert quantized["checkpoint"]["scheme"] == "q4g32-rtn" and float_model["checkpoint"] is None
    assert 0.5 < quantized["checkpoint"]["bytes_per_param"] < 1.0  # int4 codes, fp16 scales, float norms
    assert main(["eval", str(q), "--tokens", "256", "--context", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scheme"] == "q4g32-rtn"


def test_allow_pickle_reaches_the_loader(env, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(env["llama"], folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert "--allow-pickle" in one_line_error(run_cli("info", folder, env=env["env"]))
    assert run_cli("info", folder, "--allow-pickle", env=env["env"]).returncode == 0
    done = run_cli("export", folder, "--target", "onnx", "--out", tmp_path / "o", *TINY, "--no-verify",
                   "--allow-pickle", env=env["env"])
    assert done.returncode == 0, done.stderr[-2000:]


def test_unexpected_error_exits_3_with_its_traceback_in_a_file(env, capsys, monkeypatch):
    from edgeslm.cli import info
    from edgeslm.cli.main import main

    def broken(model):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "describe", broken)
    assert main(["info", str(env["llama"])]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ZeroDivisionError: a bug" in err[0]
    path = err[0].split("traceback in ")[1].split(";")[0]
    assert "Traceback" in Path(path).read_text() and "broken" in Path(path).read_text()
    os.unlink(path)


@pytest.mark.parametrize("recipe,message", [
    ('context = "512"\n', "`context` must be an integer"),
    ('targets = "onnx"\n', "`targets` must be a list"),
    ('[finetune]\ndata = "x.txt"\nsteps = 2\nwarmup = 3\n', "unknown [finetune] key(s) warmup"),
    ('[finetune]\ndata = "x.txt"\nsteps = "ten"\n', "`steps` must be a positive integer"),
])
def test_bad_recipes_are_one_line(env, tmp_path, recipe, message):
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    assert message in one_line_error(run_cli("deploy", path, "--out", tmp_path / "out", env=env["env"]))
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_counts_are_one_line(env, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "not a folder" in one_line_error(run_cli("export", env["llama"], "--target", "onnx", "--out",
                                                    tmp_path / "file" / "out", *TINY, env=env["env"]))
    assert "at least 2" in one_line_error(run_cli("eval", env["llama"], "--tokens", "0", env=env["env"]))


def test_deploy_fails_when_a_requested_target_cannot_be_built(env, tmp_path):
    recipe = tmp_path / "recipe.toml"
    # asymmetric int4 has no exact GGUF type: the requested target cannot be built
    recipe.write_text(f'model = "{env["llama"]}"\nscheme = "q4g32a-rtn"\ntargets = ["onnx", "gguf"]\ncontext = 256\n')
    done = run_cli("deploy", recipe, "--out", tmp_path / "out", "--json", env=env["env"], timeout=900)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    verdicts = {t["target"]: t["verdict"] for t in report["targets"]}
    assert verdicts == {"onnx": "pass", "gguf": "fail"} and report["ok"] is False
    assert "gguf" in done.stderr.strip().splitlines()[-1]
    assert "[deploy] onnx: export + verify" in done.stderr  # progress on stderr under --json


def test_copied_artifact_checks_and_verifies_without_the_cache(env, tmp_path):
    from edgeslm.exporter import export_artifact

    art = env["tmp"] / "llama-onnx"
    export_artifact(env["llama"], "onnx", "f32", art, context=128, prefill_chunk=16, verify=False, progress=False)
    copy = tmp_path / "elsewhere" / "artifact"
    shutil.copytree(art, copy)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    bare = {**env["env"], "EDGESLM_CACHE": str(empty)}
    budget = tmp_path / "b.toml"
    budget.write_text("prompt_tokens = 16\n")
    done = run_cli("check", copy, "--device", "host", "--budget", budget, "--runs", "1", "--decode-tokens", "4",
                   "--json", env=bare)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(c["verdict"] == "reported" for r in json.loads(done.stdout)["results"] for c in r["checks"])
    # verify needs the reference: the manifest's is named, and --reference replaces it
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["reference"] = str(tmp_path / "gone")
    from edgeslm.artifact import write_manifest

    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "format", "created", "tools")})
    assert "--reference" in one_line_error(run_cli("verify", copy, env=bare))
    done = run_cli("verify", copy, "--reference", env["llama"], "--json", env=env["env"])  # the corpus's cache
    assert done.returncode == 0 and json.loads(done.stdout)["passed"], done.stderr[-2000:]


def test_check_refuses_a_prompt_past_the_context(env, tmp_path):
    from edgeslm.exporter import export_artifact

    art = tmp_path / "a"
    export_artifact(env["llama"], "onnx", "f32", art, context=64, prefill_chunk=16, verify=False, progress=False)
    budget = tmp_path / "b.toml"
    budget.write_text("prompt_tokens = 100\n")
    assert "context" in one_line_error(run_cli("check", art, "--device", "host", "--budget", budget, env=env["env"]))


def test_two_concurrent_exports_to_one_out(env, tmp_path):
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "edgeslm.cli.main", "export", str(env["llama"]), "--target", "onnx", "--out",
           str(out), *TINY]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (loser,) = [err for code, err in results if code == 2]
    assert "another edgeslm process is writing" in loser or "already exists" in loser
    assert run_cli("verify", out, env=env["env"]).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_kill_9_leaves_nothing_and_the_next_run_cleans_up(env, tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "edgeslm.cli.main", "export", str(env["llama"]), "--target",
                             "onnx", "--out", str(out), *TINY], cwd=ROOT, env=env["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".art.tmp-*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and list(tmp_path.glob(".art.tmp-*"))  # the orphan is there, the artifact is not
    done = run_cli("export", env["llama"], "--target", "onnx", "--out", out, *TINY, "--no-verify", env=env["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_full_disk_is_one_clear_error(env, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = run_cli("export", env["llama"], "--target", "onnx", "--out", disk / "art", *TINY, "--no-verify",
                       env=env["env"])
        assert "No space left on device" in one_line_error(done)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_perplexity_windows_start_as_the_tokenizer_starts_a_text():
    """A tokenizer that puts BOS before every text (Gemma's) gets BOS before every scored window,
    as context only; one that does not (SmolLM2's) gets nothing."""
    import torch
    from tokenizers import processors

    from edgeslm.evaluate import perplexity, text_prefix
    from tiny_export import char_tokenizer

    plain = char_tokenizer()
    assert text_prefix(plain) == []
    bos = char_tokenizer()
    bos.add_special_tokens({"bos_token": "[BOS]"})
    bos_id = bos.convert_tokens_to_ids("[BOS]")
    bos._tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos_id)])
    assert text_prefix(bos) == [bos_id]

    seen = []

    def logits(ids):
        seen.append(ids[0].tolist())
        return torch.zeros(1, ids.shape[1], 100)

    tokens = torch.arange(3, 3 + 40)
    r = perplexity(logits, tokens, context=11, progress=False, prefix=[bos_id])
    assert all(window[0] == bos_id and len(window) <= 11 for window in seen)
    assert [t for w in seen for t in w[1:]] == tokens.tolist()  # every text token, once, in order
    assert r["predicted_tokens"] == 40 - len(seen) and abs(r["perplexity"] - 100) < 1e-3
