"""`edgeslm recommend`: the candidates file rebuilds to its stated shapes, a row's bytes equal
`edgeslm info`'s for the same shape (one memory calculator), the estimates are the roofline of
`check`, and unknown tasks/devices, bad budgets and budgets nothing fits are one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny_export import tiny_model_folder

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]
ISSUE_MODELS = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "phi-3-mini", "gemma-2-2b", "gemma-2-9b", "gemma-3-270m",
                "gemma-3-1b", "llama-3.2-1b", "llama-3.2-3b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b",
                "tinyllama-1.1b", "stablelm-2-1.6b"}
TASKS = {"general_chat", "code", "math", "korean", "rag", "summarization"}

# the tiny Gemma 2 of tests/tiny.py (window 8 on half the layers, soft-caps), as a candidates file
TINY_CANDIDATES = """
[[model]]
name = "tiny-gemma2"
source = "tests/tiny.py"
licence = "test"
parameters = {parameters}
[model.config]
model_type = "gemma2"
vocab_size = 97
hidden_size = 64
intermediate_size = 96
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 16
max_position_embeddings = 512
sliding_window = 8
attn_logit_softcapping = 0.5
final_logit_softcapping = 0.2
query_pre_attn_scalar = 24

[task.chat]
models = ["tiny-gemma2"]
best = "tiny-gemma2"
"""


def edgeslm(*args, timeout=300):
    return subprocess.run(EDGESLM + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def one_line_error(done, needle):
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr and needle in lines[0], done.stderr


def in_process_error(capsys, args, needle):
    """The CLI's main() in this process (the same code path as the console script, without its start-up)."""
    from edgeslm.cli.main import main

    capsys.readouterr()
    assert main(["recommend", *args]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out == "" and len(lines) == 1 and needle in lines[0], err


def test_candidates_rebuild_to_their_published_shapes():
    from edgeslm.recommend import load_candidates, meta_decoder

    models, tasks = load_candidates()
    assert set(models) == ISSUE_MODELS
    assert set(tasks) == TASKS
    for t in tasks.values():
        assert {"best", "budget", "mobile"} <= t.keys() and t["models"]
    for cand in models.values():
        assert cand.source.startswith("huggingface.co/") and cand.licence
        decoder = meta_decoder(cand)
        assert sum(p.numel() for p in decoder.parameters()) == cand.parameters, cand.name
    # spot checks against the model cards' headline figures
    assert models["qwen2.5-7b"].parameters == 7_615_616_512  # "Number of Parameters: 7.61B"
    assert models["qwen2.5-0.5b"].parameters == 494_032_768  # "Number of Parameters: 0.49B"
    spec = meta_decoder(models["gemma-2-2b"]).spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.sliding_window, sum(spec.layer_is_local)) == (
        26, 4, 256, 4096, 13)


def test_smollm2_135m_matches_the_embedded_model():
    """The one candidate whose weights ship on this machine: the embedded default's GGUF header."""
    import gguf

    from edgeslm.loading import default_model_gguf
    from edgeslm.recommend import load_candidates, meta_decoder

    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(default_model_gguf())).fields.items()
              if k.startswith("llama.")}
    cand = load_candidates()[0]["smollm2-135m"]
    spec = meta_decoder(cand).spec
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size) == (
        fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"],
        fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
        fields["llama.rope.dimension_count"], fields["llama.vocab_size"])
    assert cand.config["max_position_embeddings"] == fields["llama.context_length"]
    assert cand.config["rope_theta"] == fields["llama.rope.freq_base"]


def test_a_row_has_the_bytes_of_edgeslm_info(tmp_path):
    from edgeslm.recommend import meta_decoder
    from tiny import tiny_pair

    folder = tiny_model_folder(tmp_path / "tiny-gemma2", "gemma2")
    _, model = tiny_pair("gemma2")
    parameters = sum(p.numel() for p in model.parameters())
    cands = tmp_path / "candidates.toml"
    cands.write_text(TINY_CANDIDATES.format(parameters=parameters))
    info = edgeslm("info", folder, "--json")
    assert info.returncode == 0, info.stderr
    info = json.loads(info.stdout)
    done = edgeslm("recommend", "--task", "chat", "--device", "host", "--context", 512, "--candidates", cands, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    rows = {(x["scheme"], x["target"]): x for x in r["ranked"] + r["misfits"]}
    kv512 = next(m["kv_cache_fp16_bytes"] for m in info["memory"] if m["context"] == 512)
    assert info["parameters"] == parameters == sum(p.numel() for p in meta_decoder(
        __import__("edgeslm.recommend", fromlist=["x"]).load_candidates(cands)[0]["tiny-gemma2"]).parameters())
    # llama.cpp holds the cache in fp16, as info counts it; the onnx graphs hold it in fp32
    gguf = rows[("q4g32-gptq", "gguf")]
    assert gguf["weight_bytes"] == info["weight_bytes"]["int4-g32"]
    assert gguf["kv_cache_bytes"] == kv512 and gguf["kv_dtype"] == "fp16"
    assert rows[("f32", "onnx")]["weight_bytes"] == info["weight_bytes"]["fp32"]
    assert rows[("f32", "onnx")]["kv_cache_bytes"] == 2 * kv512
    assert rows[("q8c", "executorch")]["weight_bytes"] == info["weight_bytes"]["int8"]
    # the window caps half the layers: 2 global layers x 512 + 2 local layers x 8 positions
    assert kv512 == 2 * (2 * 512 + 2 * 8) * 2 * 16 * 2
    assert "gguf" in " ".join(gguf["reasons"])  # gguf has no gemma2: a reason, not a fit


def test_pixel8_general_chat_ranked_with_estimates():
    from edgeslm.devices import ArtifactFacts, estimate, get_profile
    from edgeslm.recommend import recommend

    r = recommend("general_chat", "pixel-8")
    assert r["figures"] == "ESTIMATED" and r["context"] == 2048 and r["ranked"]
    assert [x["rank"] for x in r["ranked"]] == list(range(1, len(r["ranked"]) + 1))
    assert [x["task_rank"] for x in r["ranked"]] == sorted(x["task_rank"] for x in r["ranked"])
    for x in r["ranked"]:
        assert x["fits"] and not x["reasons"] and x["target"] in ("executorch", "onnx")
        assert x["memory_bytes"] / 1e6 <= r["budgets"]["peak_memory_mb"]
        assert x["estimated"]["ttft_ms"] <= r["budgets"]["ttft_ms"]
    row = next(x for x in r["ranked"] if (x["model"], x["scheme"], x["target"]) == ("smollm2-135m", "q4g32-gptq", "onnx"))
    assert row["weight_bytes"] == int(134_515_008 * (0.5 + 2 / 32))
    assert row["kv_cache_bytes"] == 2 * 30 * 2048 * 3 * 64 * 4  # K+V, 30 layers, 3 kv heads x 64, fp32
    # the roofline of `check`, on the same facts
    facts = ArtifactFacts(target="onnx", size_bytes=row["weight_bytes"], params=134_515_008,
                          embedding_params=49152 * 576, tied=True, layers=30, heads=9, head_dim=64,
                          kv_bytes_per_position=30 * 2 * 3 * 64 * 4, local_kv_bytes=0, window=None, context_length=2048)
    est = estimate(get_profile("pixel-8"), facts, 128, 32)
    assert row["estimated"]["ttft_ms"] == pytest.approx(est["ttft_ms"])
    assert row["estimated"]["decode_tok_s"] == pytest.approx(est["decode_tok_s"])
    # the 7B fits nowhere on a phone, and says why
    big = [x for x in r["misfits"] if x["model"] == "qwen2.5-7b" and x["scheme"] == "q4g32-gptq"]
    assert big and all(any("budget" in why for why in x["reasons"]) for x in big)
    korean = recommend("korean", "pixel-8")
    assert {x["model"] for x in korean["ranked"]} <= {"gemma-2-9b", "qwen2.5-7b", "gemma-2-2b", "qwen2.5-1.5b",
                                                      "qwen2.5-0.5b"}


def test_cli_json_and_bad_input(tmp_path, capsys):
    done = edgeslm("recommend", "--task", "general_chat", "--device", "pixel-8", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["ranked"][0]["weight_bytes"] > 0 and r["ranked"][0]["kv_cache_bytes"] > 0
    assert r["ranked"][0]["estimated"]["decode_tok_s"] > 0
    assert all(x["estimated"]["label"] == "ESTIMATED (roofline)" for x in r["ranked"] + r["misfits"])
    in_process_error(capsys, ["--task", "poetry", "--device", "pixel-8"], "unknown task 'poetry'")
    in_process_error(capsys, ["--task", "code", "--device", "toaster"], "unknown device 'toaster'")
    bad = tmp_path / "bad.toml"
    bad.write_text("ttft_ms = -5\n")
    in_process_error(capsys, ["--task", "code", "--device", "pixel-8", "--budget", str(bad)], "must be positive")
    bad.write_text("context = 0\n")
    in_process_error(capsys, ["--task", "code", "--device", "pixel-8", "--budget", str(bad)], "context must be")
    tight = tmp_path / "tight.toml"
    tight.write_text("context = 1024\npeak_memory_mb = 20\n[device.pixel-8]\ndecode_tok_s = 20\n")
    done = edgeslm("recommend", "--task", "code", "--device", "pixel-8", "--budget", tight)
    one_line_error(done, "no candidate fits pixel-8 for code")
    assert "nearest:" in done.stderr and "needs peak_memory_mb >= " in done.stderr
    done = edgeslm("recommend", "--task", "code", "--device", "pixel-8", "--budget", tight, "--json")
    assert done.returncode == 2
    r = json.loads(done.stdout)  # --json still prints the whole result, nearest candidates included
    assert r["ranked"] == [] and r["context"] == 1024 and r["budgets"]["decode_tok_s"] == 20
    assert r["nearest"] and all("peak_memory_mb" in x["needs"] for x in r["nearest"])
