"""The WebGPU runner: the artifact in real headless Chromium, driven from Python.

  Python (this file) --stdin/stdout JSON lines--> node page/driver.mjs --playwright-core--> Chromium
  Chromium loads http://127.0.0.1:<free port>/page/index.html, which serves only: the runner page
  (page/), the tvmjs bundle of @mlc-ai/web-runtime, and the artifact folder under /artifact/.

Chromium runs with a fresh user-data-dir and the WebGPU flags in page/driver.mjs; on a machine without a GPU,
--enable-unsafe-webgpu gives SwiftShader (software Vulkan: f32 only, no shader-f16).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from edgeslm.errors import EdgeSLMError
from edgeslm.loading import cache_dir

from ..base import Runner

PAGE_DIR = Path(__file__).parent / "page"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_HINT = "apt-get install -y chromium (or run scripts/setup.sh)"
NODE_PACKAGES = {"playwright-core": "1.65.1", "@mlc-ai/web-runtime": "0.27.0-dev0", "@mlc-ai/web-llm": "0.2.85"}
NODE_HINT = "run scripts/setup.sh (npm installs " + " ".join(f"{k}@{v}" for k, v in NODE_PACKAGES.items()) + \
    " into ~/.cache/edgeslm/node)"


def node_dir() -> Path:
    return Path(os.environ.get("EDGESLM_NODE_DIR", cache_dir() / "node"))


def chromium_path() -> str:
    path = os.environ.get("EDGESLM_CHROMIUM", CHROMIUM)
    if not Path(path).is_file():
        found = shutil.which("chromium")
        if found is None:
            raise EdgeSLMError(f"Chromium is not installed ({path} missing); the webgpu runner needs it: {CHROMIUM_HINT}")
        path = found
    return path


def missing_parts() -> str | None:
    """None when Chromium, node and the npm packages are all here, else what to install."""
    try:
        chromium_path()
    except EdgeSLMError as e:
        return str(e)
    if shutil.which("node") is None:
        return "node is not installed; the webgpu runner needs it: apt-get install -y nodejs npm"
    for name in NODE_PACKAGES:
        if not (node_dir() / "node_modules" / name / "package.json").is_file():
            return f"the npm package {name} is missing; {NODE_HINT}"
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves a fixed table of roots and nothing else (no listings, no paths outside them)."""

    roots: dict[str, Path] = {}
    files: dict[str, Path] = {}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        target = self.files.get(path)
        if target is None:
            for prefix, root in self.roots.items():
                if path.startswith(prefix):
                    rel = path[len(prefix):]
                    candidate = (root / rel).resolve()
                    if rel and candidate.is_file() and root.resolve() in candidate.parents:
                        target = candidate
                    break
        if target is None:
            self.send_error(404)
            return
        data = target.read_bytes()
        ctype = {".html": "text/html", ".js": "text/javascript", ".json": "application/json",
                 ".wasm": "application/wasm"}.get(target.suffix, "application/octet-stream")
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def serve(folder: Path, page: str = "index.html"):
    """A static server on 127.0.0.1 and a free port, for one artifact folder. -> (server, url).
    The folder is served twice: under /artifact/ for the tvmjs page and under
    /model/resolve/main/, the layout WebLLM's engine expects of a model URL."""
    runtime_js = node_dir() / "node_modules/@mlc-ai/web-runtime/lib/index.js"
    handler = type("Handler", (_Handler,), {
        "roots": {"/artifact/": Path(folder), "/model/resolve/main/": Path(folder), "/page/": PAGE_DIR,
                  "/webllm/": node_dir() / "node_modules/@mlc-ai/web-llm/lib"},
        "files": {"/runtime/tvmjs.bundle.js": runtime_js},
    })
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/page/{page}"


class BrowserRunner(Runner):
    """One Chromium page holding the loaded artifact; prefill/decode go through it."""

    runtime_name = "@mlc-ai/web-runtime " + NODE_PACKAGES["@mlc-ai/web-runtime"]
    # SwiftShader runs SmolLM2-135M at ~1 s per prefill token on 2 cores: a 512-token perplexity
    # window in one call would outlast the per-call timeout, so score() feeds it in chunks
    score_chunk = 64

    page = "index.html"

    def __init__(self, folder: Path, timeout_s: float = 600.0):
        problem = missing_parts()
        if problem:
            raise EdgeSLMError(problem)
        self.folder = Path(folder)
        meta = json.loads((self.folder / "webgpu.json").read_text())
        self.vocab = meta["vocab_size"]
        self.context = meta.get("context_length")
        self.timeout_s = timeout_s
        self.server, url = serve(self.folder, self.page)
        self.profile = tempfile.mkdtemp(prefix="edgeslm-chromium-")
        env = dict(os.environ, NODE_PATH=str(node_dir() / "node_modules"),
                   EDGESLM_PLAYWRIGHT=str(node_dir() / "node_modules" / "playwright-core"))
        self.proc = subprocess.Popen(
            ["node", str(PAGE_DIR / "driver.mjs"), chromium_path(), url, self.profile],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            ready = self._read()
        except Exception:
            self.close()
            raise
        if not ready.get("ok"):
            self.close()
            raise EdgeSLMError(self._explain(ready))
        self.adapter = ready["adapter"]
        self.load_ms = ready["load_ms"]
        desc = " ".join(x for x in (self.adapter.get("vendor"), self.adapter.get("architecture")) if x)
        self.runtime = f"{self.runtime_name} in {self._chromium_version()} on WebGPU ({desc or 'adapter'})"
        self.past = 0

    @staticmethod
    def _explain(msg: dict) -> str:
        kind, text = msg.get("kind"), msg.get("message", "unknown failure")
        if kind == "missing_feature":
            return f"{text}; build the artifact with --compute-dtype float32 (q4f32), or run on a GPU with shader-f16"
        if kind == "buffer_limit":
            return text
        tail = "; ".join(msg.get("console", [])[-3:])
        return f"the webgpu page failed ({kind}): {text}" + (f" [console: {tail}]" if tail else "")

    def _chromium_version(self) -> str:
        try:
            out = subprocess.run([chromium_path(), "--version"], capture_output=True, text=True, timeout=30).stdout
            return out.strip() or "Chromium"
        except (OSError, subprocess.TimeoutExpired):
            return "Chromium"

    def _read(self) -> dict:
        result: dict = {}

        def reader():
            line = self.proc.stdout.readline()
            result["line"] = line

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(self.timeout_s)
        line = result.get("line")
        if not line:
            err = ""
            if self.proc.poll() is not None:
                err = self.proc.stderr.read()[-1500:]
            raise EdgeSLMError(f"the webgpu browser runner stopped answering: {err.strip() or 'timeout'}")
        return json.loads(line)

    def _call(self, op: str, *args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        if not msg.get("ok"):
            raise EdgeSLMError(self._explain(msg))
        return msg

    def _logits(self, b64: str, rows: int) -> torch.Tensor:
        arr = np.frombuffer(base64.b64decode(b64), dtype="<f4").reshape(rows, self.vocab)
        return torch.from_numpy(arr.copy())

    def reset(self):
        self._call("reset")
        self.past = 0

    def _check_room(self, end: int):
        if self.context is not None and end > self.context:
            raise EdgeSLMError(f"webgpu runner: position {end - 1} is past the artifact's context ({self.context})")

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if start == 0 and self.past:
            self.reset()
        ids = [int(t) for t in tokens.reshape(-1)]
        self._check_room(start + len(ids))
        msg = self._call("prefill", ids, int(start))
        self.past = start + len(ids)
        return self._logits(msg["logits"], len(ids)).unsqueeze(0)

    def decode(self, token: int, pos: int) -> torch.Tensor:
        if pos != self.past:
            raise EdgeSLMError(f"webgpu runner: decode at {pos} but the cache holds {self.past} tokens")
        self._check_room(pos + 1)
        msg = self._call("prefill", [int(token)], int(pos))
        self.past = pos + 1
        return self._logits(msg["logits"], 1)[0]

    def generate_greedy(self, prompt: torch.Tensor, steps: int):
        """The whole greedy loop inside the page (one round trip); timings in self.last_timings."""
        self._check_room(prompt.shape[1] + steps - 1)
        msg = self._call("generate", [int(t) for t in prompt.reshape(-1)], int(steps))
        self.past = prompt.shape[1] + steps - 1
        decode = msg["decode_ms"]
        self.last_timings = {
            "prefill_ms": msg["prefill_ms"], "prompt_tokens": int(prompt.shape[1]),
            "decode_ms_median": float(np.median(decode)) if decode else None,
            "decode_tok_s": 1000.0 / float(np.median(decode)) if decode else None,
        }
        return torch.tensor(msg["tokens"]), self._logits(msg["logits"], steps)

    def close(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
        if getattr(self, "server", None) is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if getattr(self, "profile", None):
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None


class WebLLMRunner(BrowserRunner):
    """The artifact loaded, unchanged, by @mlc-ai/web-llm's CreateMLCEngine in the same headless
    Chromium. The engine exposes tokens, not logits, so this runner generates; verify's logit
    parity stays with the tvmjs page (BrowserRunner), which runs the same model library."""

    page = "webllm.html"
    runtime_name = "@mlc-ai/web-llm " + NODE_PACKAGES["@mlc-ai/web-llm"]

    def prefill(self, tokens, start):
        raise EdgeSLMError("WebLLM's engine returns sampled tokens, not logits; use generate_greedy")

    decode = prefill

    def stream_greedy(self, prompt: torch.Tensor, steps: int):
        """Yields (token, None) for up to `steps` greedy steps, one engine call each (the engine
        keeps its logits on the GPU)."""
        self._check_room(prompt.shape[1] + steps - 1)
        token = self._call("begin", [int(t) for t in prompt.reshape(-1)])["token"]
        for step in range(steps):
            yield token, None
            if step + 1 < steps:
                token = self._call("step", int(token))["token"]

    def generate_greedy(self, prompt: torch.Tensor, steps: int):
        """Greedy tokens through the engine's forwardTokensAndSample (temperature 0)."""
        self._check_room(prompt.shape[1] + steps - 1)
        msg = self._call("generate", [int(t) for t in prompt.reshape(-1)], int(steps))
        decode = msg["decode_ms"]
        self.last_timings = {
            "prefill_ms": msg["prefill_ms"], "prompt_tokens": int(prompt.shape[1]),
            "decode_ms_median": float(np.median(decode)) if decode else None,
            "decode_tok_s": 1000.0 / float(np.median(decode)) if decode else None,
        }
        return torch.tensor(msg["tokens"])

    def generate_forced(self, tokens: torch.Tensor) -> torch.Tensor:
        """The engine's greedy choice after each position of a given sequence (prefill of the
        first token, then the given tokens one decode at a time, whatever the engine picked)."""
        ids = [int(t) for t in tokens.reshape(-1)]
        self._check_room(len(ids))
        return torch.tensor(self._call("generate", ids[:1], len(ids), ids[1:])["tokens"])

    def complete(self, prompt: str, max_tokens: int) -> dict:
        """The engine's OpenAI-style completions.create at temperature 0 (its tokenizer and stops)."""
        return self._call("complete", prompt, int(max_tokens))
