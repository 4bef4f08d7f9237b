"""edgeslm check / bench on a real tiny ONNX artifact, run in onnxruntime (no mocks)."""

from __future__ import annotations

import json

import pytest

from edgeslm.cli.main import main


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    from tiny_export import tiny_model_folder

    from edgeslm.exporter import export_artifact

    root = tmp_path_factory.mktemp("check")
    model = tiny_model_folder(root / "tiny-llama", family="llama")
    out = root / "tiny-onnx"
    export_artifact(model, "onnx", "f32", out, context=64, prefill_chunk=16, verify=False, progress=False)
    return out


def run_json(capsys, argv):
    code = main(argv + ["--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def test_check_host_measures_with_a_spread_and_estimates_phones(onnx_artifact, capsys, tmp_path):
    budget = tmp_path / "b.toml"
    budget.write_text("prompt_tokens = 24\n")  # fits the tiny artifact's 64-token context with 8 decode steps
    argv = ["check", str(onnx_artifact), "--device", "host", "--device", "pixel-8", "--device", "iphone-15-pro",
            "--budget", str(budget), "--runs", "3", "--decode-tokens", "8"]
    # no runner reaches the phones here: their estimates never pass on their own
    code, out, err = run_json(capsys, argv)
    assert code == 1 and out["passed"] is False
    assert "only estimated, not measured" in err and "--allow-estimates" in err
    assert out["verdicts"]["fail"] == 0 and out["verdicts"]["unverified"] > 0
    code, out, err = run_json(capsys, argv + ["--allow-estimates"])
    assert code == 0, err
    assert out["passed"] is True
    host = [r for r in out["results"] if r["device"] == "host"]
    assert len(host) == 1 and host[0]["measured"] is True
    assert host[0]["runner"].startswith("host: onnxruntime")
    ttft = host[0]["figures"]["ttft_ms"]
    assert ttft["n"] == 3 and 0 < ttft["min"] <= ttft["median"] <= ttft["p90"] <= ttft["max"]
    tok_s = host[0]["figures"]["decode_tok_s"]
    assert 0 < tok_s["min"] <= tok_s["p90"] <= tok_s["median"] <= tok_s["max"]
    assert host[0]["figures"]["peak_memory_mb"]["value"] > 50  # a real process: python + onnxruntime
    assert {c["figure"] for c in host[0]["checks"]} == {"ttft_ms", "decode_tok_s", "peak_memory_mb", "artifact_mb"}
    # the budget file sets no host budget, and host has none of its own: reported, not judged
    assert {c["verdict"] for c in host[0]["checks"]} == {"reported"}
    for device in ("pixel-8", "iphone-15-pro"):
        (r,) = [r for r in out["results"] if r["device"] == device]
        assert r["measured"] is False and r["runner"].startswith("estimated")
        assert r["note"]  # why no runner reached it
        assert r["figures"]["decode_tok_s"]["value"] > 0 and "p90" not in r["figures"]["ttft_ms"]
        assert {c["verdict"] for c in r["checks"]} <= {"unverified", "fail"}  # never "pass"
    # the table labels estimates as such, on every row
    assert main(["check", str(onnx_artifact), "--device", "pixel-8", "--budget", str(budget)]) == 1
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("tiny-onnx")]
    assert rows and all("ESTIMATED" in line and ("UNVERIFIED" in line or "FAIL" in line) for line in rows)


def test_check_exit_codes(onnx_artifact, capsys, tmp_path):
    impossible = tmp_path / "impossible.toml"
    impossible.write_text("prompt_tokens = 16\n[device.host]\ndecode_tok_s = 1e9\n")
    code, out, err = run_json(capsys, ["check", str(onnx_artifact), "--device", "host", "--budget", str(impossible),
                                       "--runs", "1", "--warmup", "0", "--decode-tokens", "4"])
    assert code == 1
    assert out["passed"] is False
    (fail,) = [c for r in out["results"] for c in r["checks"] if c["verdict"] == "fail"]
    assert fail["figure"] == "decode_tok_s" and fail["value"] < 1e9
    assert "budget check(s) failed" in err

    nan = tmp_path / "nan.toml"
    nan.write_text("ttft_ms = nan\n")
    for argv, match in [(["--budget", str(nan)], "finite"), (["--device", "no-such-phone"], "unknown device"),
                        (["--budget", str(tmp_path / "missing.toml")], "cannot read")]:
        device = [] if "--device" in argv else ["--device", "host"]
        code = main(["check", str(onnx_artifact), *device, *argv])
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and match in err and "Traceback" not in err


def test_bench_sweeps_contexts_and_batches(onnx_artifact, capsys):
    code, out, err = run_json(capsys, ["bench", str(onnx_artifact), "--contexts", "8,24", "--batch", "1,4",
                                       "--runs", "2", "--decode-tokens", "4", "--device", "host",
                                       "--device", "galaxy-s24"])
    assert code == 0, err
    host1 = {r["prompt_tokens"]: r for r in out["results"] if r["device"] == "host" and r["batch"] == 1}
    assert set(host1) == {8, 24} and all(r["measured"] for r in host1.values())
    host4 = [r for r in out["results"] if r["device"] == "host" and r["batch"] == 4]
    assert host4 and not any(r["measured"] for r in host4)  # batch > 1: the runners are batch 1, so estimated
    phone = {(r["prompt_tokens"], r["batch"]): r for r in out["results"] if r["device"] == "galaxy-s24"}
    assert len(phone) == 4 and not any(r["measured"] for r in phone.values())
    assert phone[(8, 4)]["figures"]["decode_tok_s"]["value"] > phone[(8, 1)]["figures"]["decode_tok_s"]["value"]
    assert main(["bench", str(onnx_artifact), "--contexts", "100"]) == 2  # past the 64-token context
    assert "exceeds" in capsys.readouterr().err
