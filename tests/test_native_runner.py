"""edgeslm-runner: CMake builds it against the executorch wheel; on a tiny .pte exported by the
ExecuTorch target it drives forward(tokens, input_pos) as ExecuTorch's LLM runner does, and its
greedy tokens equal the Python ExecuTorch runtime's (Gemma 2: traced attention; Llama: the
runtime's llama::custom_sdpa, whose kernels the runner loads from the wheel)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from edgeslm.latency import build_native_runner, native_args, pte_file, run_native


@pytest.fixture(scope="module")
def runner_binary():
    return build_native_runner()  # cached under ~/.cache/edgeslm/native/<sources+version digest>


@pytest.fixture(scope="module")
def et_artifact(tmp_path_factory):
    from tiny import tiny_pair
    from tiny_export import char_tokenizer

    from edgeslm.exporter import export_artifact

    root = tmp_path_factory.mktemp("native")
    # Gemma 2 (window 8, soft-caps), one local + one global layer (lowering time grows with layers):
    # the decode below runs past the window, through the ring buffer
    hf, _ = tiny_pair("gemma2", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    model = root / "tiny-gemma2"
    hf.save_pretrained(str(model), safe_serialization=True)
    char_tokenizer().save_pretrained(str(model))
    out = root / "tiny-et"
    export_artifact(model, "executorch", "f32", out, context=64, prefill_chunk=8, verify=False, progress=False)
    return out


@pytest.fixture(scope="module")
def et_llama(tmp_path_factory):
    from tiny import tiny_pair
    from tiny_export import char_tokenizer

    from edgeslm.exporter import export_artifact

    root = tmp_path_factory.mktemp("native-llama")
    hf, _ = tiny_pair("llama", num_hidden_layers=2)
    model = root / "tiny-llama"
    hf.save_pretrained(str(model), safe_serialization=True)
    char_tokenizer().save_pretrained(str(model))
    out = root / "tiny-et"
    export_artifact(model, "executorch", "f32", out, context=64, prefill_chunk=8, verify=False, progress=False)
    return out


def test_native_tokens_equal_the_python_runtime(runner_binary, et_artifact):
    from edgeslm.artifact import read_manifest
    from edgeslm.targets.registry import get_target

    manifest = read_manifest(et_artifact)
    prompt = [5, 17, 42, 3, 88, 61, 9, 30, 71, 12, 50]  # 11 tokens, past the window of 8
    steps = 24
    python_runner = get_target("executorch").load(et_artifact, manifest)
    expected, _ = python_runner.generate_greedy(torch.tensor([prompt]), steps)
    data = native_args(et_artifact, manifest)
    assert data[0] == "--data" and data[1].endswith(".ptd")
    result, rss_mb = run_native(runner_binary, pte_file(et_artifact, manifest), prompt, steps, runs=2, warmup=1, extra=data)
    assert result["tokens"] == expected.tolist()
    chunked, _ = run_native(runner_binary, pte_file(et_artifact, manifest), prompt, steps, extra=[*data, "--chunk", "4"])
    assert chunked["tokens"] == expected.tolist() and chunked["max_seq_len"] == 4  # the prompt in 4 + 4 + 3
    assert result["method"] == "forward" and result["max_seq_len"] == 64 and result["max_context_len"] == 64
    assert len(result["runs"]) == 2 and all(len(r["decode_ms"]) == steps - 1 for r in result["runs"])
    assert all(r["ttft_ms"] > 0 and min(r["decode_ms"]) > 0 for r in result["runs"])
    assert rss_mb > 1 and result["peak_rss_kb"] > 0
    # a short prompt, and a one-token prompt (decode only)
    for p in (prompt[:8], prompt[:1]):
        want, _ = python_runner.generate_greedy(torch.tensor([p]), 12)
        got, _ = run_native(runner_binary, pte_file(et_artifact, manifest), p, 12, extra=data)
        assert got["tokens"] == want.tolist()


def test_native_runner_runs_the_runtime_llm_ops(runner_binary, et_llama):
    from edgeslm.artifact import read_manifest
    from edgeslm.targets.registry import get_target

    manifest = read_manifest(et_llama)
    assert list(manifest["attention"]) == ["llama::update_cache + llama::custom_sdpa"]
    prompt = [5, 17, 42, 3, 88, 61, 9, 30, 71, 12, 50]
    want, _ = get_target("executorch").load(et_llama, manifest).generate_greedy(torch.tensor([prompt]), 20)
    got, _ = run_native(runner_binary, pte_file(et_llama, manifest), prompt, 20,
                        extra=native_args(et_llama, manifest))
    assert got["tokens"] == want.tolist()


def test_native_runner_rejects_bad_input(runner_binary, et_artifact, tmp_path):
    pte = str(next(et_artifact.glob("*.pte")))
    model = ["--model", pte, "--data", str(next(et_artifact.glob("*.ptd")))]
    cases = [[*model, "--tokens", ",".join(["1"] * 60), "--steps", "10"],  # past the context of 64
             ["--model", str(tmp_path / "none.pte"), "--tokens", "1"], [*model, "--tokens", "1,x"],
             ["--model", pte, "--data", str(tmp_path / "none.ptd"), "--tokens", "1"],
             [*model, "--tokens", "100000"], model, [*model, "--tokens", "1", "--bogus", "1"],
             [*model, "--tokens", "1", "--chunk", "65"]]  # more than get_max_seq_len
    for args in cases:
        p = subprocess.run([str(runner_binary), *args], capture_output=True, text=True)
        assert p.returncode == 2, args
        errors = [line for line in p.stderr.splitlines() if line.startswith("edgeslm-runner: error")]
        assert errors and p.stdout == "", args
    broken = tmp_path / "broken.pte"
    broken.write_bytes(b"not a program" * 100)
    p = subprocess.run([str(runner_binary), "--model", str(broken), "--tokens", "1"], capture_output=True, text=True)
    assert p.returncode == 1 and "failed" in p.stderr
    p = subprocess.run([str(runner_binary), "--model", pte, "--tokens", "1"], capture_output=True, text=True)
    assert p.returncode == 1 and "failed" in p.stderr  # the program without its weights file


def test_check_on_host_reports_the_native_runner(runner_binary, et_artifact, capsys, tmp_path):
    from edgeslm.cli.main import main

    budget = tmp_path / "b.toml"
    budget.write_text("prompt_tokens = 20\n")
    code = main(["check", str(et_artifact), "--device", "host", "--budget", str(budget), "--runs", "2",
                 "--decode-tokens", "6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    runners = {r["runner"].split(":")[0]: r for r in out["results"]}
    assert set(runners) == {"host", "native"}
    assert runners["host"]["runner"].startswith("host: executorch")
    for r in runners.values():
        assert r["measured"] and r["figures"]["ttft_ms"]["n"] == 2
    # both runners run the same program on the same prompt, so they agree on the tokens
    assert runners["native"]["tokens"] == runners["host"]["tokens"]
