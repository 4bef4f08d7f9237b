"""Fine-tuning on tiny models: LoRA lowers the loss and --merge equals the adapter model, QLoRA
trains over a frozen int4 base, distillation runs and refuses a foreign vocabulary, a resumed run
repeats an uninterrupted one, and bad data files are one line + exit 2."""

import json
import string
import subprocess
import sys

import pytest
import torch

from tiny import tiny_pair

from edgeslm.errors import EdgeSLMError
from edgeslm.finetune import FinetuneConfig, add_lora, finetune, load_adapters
from edgeslm.loading import load_model
from edgeslm.schemes.int4 import Int4Linear

EDGESLM = [sys.executable, "-m", "edgeslm.cli.main"]
TEXT = "\n".join(f"Line {i}: the cat sat on the mat and then the dog ran to the park." for i in range(48))


def char_tokenizer(chat: bool = False):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["[UNK]", "\n"] + [c for c in string.printable if 32 <= ord(c) < 127]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="\n")
    if chat:
        tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def make_folder(path, family="llama", seed=0, chat=False, **overrides):
    hf, _ = tiny_pair(family, seed=seed, **overrides)
    hf.save_pretrained(str(path), safe_serialization=True)
    char_tokenizer(chat).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    (root / "data.txt").write_text(TEXT)
    return make_folder(root / "model"), root


def cfg(**kw):
    base = dict(steps=8, lr=1e-2, seq_len=64, batch_size=4, rank=4, alpha=8, save_every=4)
    base.update(kw)
    return FinetuneConfig(**base)


def test_lora_lowers_loss_and_merge_equals_adapters(tiny):
    folder, root = tiny
    facts = finetune(folder, root / "data.txt", root / "lora", cfg(grad_accum=2), merge=True, progress=False)
    assert facts["last_loss"] < 0.8 * facts["first_loss"], facts["losses"]
    assert not facts["qlora"]
    merged, _, _ = load_model(root / "lora")  # a plain float folder, read by the ordinary loader
    adapted, _, _ = load_model(folder)
    adapted = load_adapters(add_lora(adapted, cfg()), root / "lora" / "adapter.safetensors").eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapted(ids)[0], merged(ids)[0]
    base, _, _ = load_model(folder)
    assert (a - base(ids)[0]).abs().max() > 1e-2  # the adapters changed the function...
    torch.testing.assert_close(m, a, rtol=0, atol=1e-4)  # ...and merging keeps exactly that function


def test_qlora_trains_over_frozen_int4(tiny):
    folder, root = tiny
    facts = finetune(folder, root / "data.txt", root / "qlora", cfg(qlora="q4g32-rtn"), merge=True, progress=False)
    assert facts["qlora"] and facts["last_loss"] < 0.8 * facts["first_loss"], facts["losses"]
    # the adapters sit on Int4Linear modules whose packed codes stay frozen buffers
    model, _, _ = load_model(folder)
    from edgeslm.quantizer import quantize_model
    from edgeslm.schemes import get_scheme

    quantize_model(model, get_scheme("q4g32-rtn"), progress=False)
    model = add_lora(model, cfg())
    bases = [m.get_base_layer() for n, m in model.named_modules() if n.endswith("q_proj")]
    assert all(isinstance(b, Int4Linear) for b in bases)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}


def test_resume_repeats_an_uninterrupted_run(tiny):
    folder, root = tiny
    straight = finetune(folder, root / "data.txt", root / "straight", cfg(steps=6, dropout=0.1), progress=False)
    finetune(folder, root / "data.txt", root / "resumed", cfg(steps=3, dropout=0.1), progress=False)
    resumed = finetune(folder, root / "data.txt", root / "resumed", cfg(steps=6, dropout=0.1), resume=True,
                       force=True, progress=False)
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-4)


def test_distillation_and_vocab_mismatch(tiny, tmp_path):
    folder, root = tiny
    teacher = make_folder(tmp_path / "teacher", seed=3)
    facts = finetune(folder, root / "data.txt", tmp_path / "kd", cfg(steps=4, teacher=str(teacher)), progress=False)
    assert facts["teacher"] == str(teacher) and facts["last_loss"] < facts["first_loss"]
    other = make_folder(tmp_path / "other", seed=3, vocab_size=120)
    with pytest.raises(EdgeSLMError, match="vocabulary"):
        finetune(folder, root / "data.txt", tmp_path / "kd2", cfg(steps=1, teacher=str(other)), progress=False)


def test_jsonl_prompt_response_uses_chat_template(tmp_path):
    from edgeslm.finetune import IGNORE, load_examples

    tok = char_tokenizer(chat=True)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"text": "plain"}) + "\n")
    (ids, labels), (ids2, _), _ = load_examples(data, tok, 128)
    assert tok.decode(ids).replace(" ", "") == "<user>hi\n<assistant>hello\n".replace(" ", "")
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(trained).replace(" ", "") == "hello\n"  # only the response carries loss
    assert tok.decode(ids2).replace(" ", "").startswith("<user>a")


def test_record_without_fields_is_refused(tmp_path):
    from edgeslm.finetune import load_examples

    data = tmp_path / "r.jsonl"
    data.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises(EdgeSLMError, match="r.jsonl:1 has none of"):
        load_examples(data, char_tokenizer(), 64)


def _one_line_error(done, needle):
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr and needle in lines[0], done.stderr


@pytest.mark.parametrize("content,needle", [("", "is empty"), ('{"text": "x"}\n{not json\n', "bad.jsonl:2 is not valid JSON")])
def test_cli_bad_data_is_one_line(tiny, tmp_path, content, needle):
    folder, _ = tiny
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    done = subprocess.run(EDGESLM + ["finetune", str(folder), "--data", str(data), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    _one_line_error(done, needle)
    assert not (tmp_path / "o").exists()
