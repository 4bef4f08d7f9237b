"""Latency runners: who can time an artifact on a device, and the timing itself.

Every result says which runner produced it and whether it was measured or estimated:
  host       the target's own Runner (onnxruntime, the ExecuTorch Python runtime, ...) on this CPU,
             in a fresh child process so its peak RSS is the artifact's alone
  native     edgeslm-runner (CMakeLists.txt, targets/native/) on a .pte, on this CPU
  android    edgeslm-runner cross-built for arm64-v8a, pushed with adb when `adb devices` lists one
  browser    the WebGPU target's Runner (Chromium on this machine) for the browser profile
  macos      the Core ML target's Runner (MLModel.predict with state) on macOS only
  estimated  the roofline of devices.estimate when no runner reaches the device

A measurement is `warmup` untimed generations, then `runs` timed ones, each from an empty cache:
prefill of the prompt + the first argmax (TTFT), then decode_tokens - 1 greedy decode steps.
Figures carry the median and p90 over runs; p90 is the slow tail (the 90th percentile of TTFT,
the 10th percentile of tokens/s).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import EdgeSLMError

REPO = Path(__file__).resolve().parent.parent
RUNNER_SOURCES = ("CMakeLists.txt", "targets/native/edgeslm_runner.cpp")
ANDROID_DIR = "/data/local/tmp/edgeslm"


# ---- figures -------------------------------------------------------------------------------------------

def percentile(values, q: int) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    xs = list(values)
    return float(xs[0]) if len(xs) == 1 else statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def spread(values, slow_is_high: bool = True) -> dict:
    return {"median": statistics.median(values), "p90": percentile(values, 90 if slow_is_high else 10),
            "min": min(values), "max": max(values), "n": len(values)}


def figures_from_runs(runs: list[dict], decode_tokens: int) -> dict:
    """runs: [{"ttft_ms": float, "decode_ms": [per step]}] -> spread figures."""
    ttft = [r["ttft_ms"] for r in runs]
    figures = {"ttft_ms": spread(ttft)}
    if decode_tokens > 1:
        tok_s = [len(r["decode_ms"]) / (sum(r["decode_ms"]) / 1e3) for r in runs]
        figures["decode_tok_s"] = spread(tok_s, slow_is_high=False)
    return figures


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt (token ids away from the special ids at the start of a vocabulary)."""
    import random

    rng = random.Random(seed)
    low = min(16, vocab - 1)
    return [rng.randrange(low, vocab) for _ in range(n)]


# ---- host: the target's own Runner, in a child process --------------------------------------------------

def time_runner(runner, prompt: list[int], decode_tokens: int, runs: int, warmup: int) -> dict:
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    results, tokens = [], None
    for i in range(warmup + runs):
        runner.reset()
        t0 = time.perf_counter()
        nxt = int(runner.prefill(ids, 0)[0, -1].argmax())
        ttft = (time.perf_counter() - t0) * 1e3
        out, decode_ms = [nxt], []
        for step in range(decode_tokens - 1):
            t = time.perf_counter()
            nxt = int(runner.decode(nxt, len(prompt) + step).argmax())
            decode_ms.append((time.perf_counter() - t) * 1e3)
            out.append(nxt)
        if i >= warmup:
            results.append({"ttft_ms": ttft, "decode_ms": decode_ms})
        if tokens is None:
            tokens = out
        elif out != tokens:
            raise EdgeSLMError("runs disagree on the greedy tokens: the runner's reset() does not empty the cache")
    return {"runs": results, "tokens": tokens}


def _child_measure(folder: str, prompt_tokens: int, decode_tokens: int, runs: int, warmup: int) -> dict:
    from .artifact import read_manifest
    from .console import quiet_third_party_noise
    from .targets.registry import get_target

    quiet_third_party_noise()
    manifest = read_manifest(Path(folder))
    target = get_target(manifest["target"])
    runner = target.load(Path(folder), manifest)
    vocab = _vocab(folder, manifest)
    prompt = prompt_ids(vocab, prompt_tokens)
    timed = time_runner(runner, prompt, decode_tokens, runs, warmup)
    runner.close()
    return {"runtime": runner.runtime or manifest["target"], **timed}


def run_measured(cmd: list[str], env=None, timeout: float | None = None) -> tuple[dict, float]:
    """Runs cmd (which prints one JSON object) and reads its peak RSS from os.wait4 -> (json, MB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # wait4 with a deadline: poll, so that a hung runtime is killed, not waited on
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise EdgeSLMError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, lines = out.read(), [ln for ln in err.read().splitlines() if ln.strip()]
    if code != 0:
        last = lines[-1] if lines else f"exit code {code}"
        raise EdgeSLMError(f"{Path(cmd[0]).name} failed: {last}") if code == 2 else RuntimeError(last)
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{Path(cmd[0]).name} printed no JSON: {stdout[-300:]!r} {lines[-3:]!r}") from None
    return result, usage.ru_maxrss * 1024 / 1e6


def measure_host(folder, prompt_tokens: int, decode_tokens: int, runs: int, warmup: int,
                 timeout: float = 1800, label: str = "host") -> dict:
    """The target's own Runner in a child process. label: host, browser (the WebGPU Runner drives
    Chromium) or macos (the Core ML Runner), for the result's runner name."""
    cmd = [sys.executable, "-m", "edgeslm.latency", str(folder), str(prompt_tokens), str(decode_tokens),
           str(runs), str(warmup)]
    result, rss_mb = run_measured(cmd, timeout=timeout)
    note = ("peak RSS of the largest single process of the run (the Python driver or one Chromium process; "
            "a browser's processes are not summed)" if label == "browser"
            else "peak RSS of the child process, Python runtime included")
    return {"runner": f"{label}: {result['runtime']}", "measured": True, "tokens": result["tokens"],
            "figures": {**figures_from_runs(result["runs"], decode_tokens),
                        "peak_memory_mb": {"value": rss_mb, "note": note}}}


def _vocab(folder, manifest: dict) -> int:
    from .config import spec_from_hf_config
    from .loading import read_hf_config

    if manifest.get("vocab_size"):
        return int(manifest["vocab_size"])
    if (Path(folder) / "config.json").is_file():
        return spec_from_hf_config(read_hf_config(Path(folder))).vocab_size
    raise EdgeSLMError(f"{folder}: cannot tell the vocabulary size (no vocab_size in the manifest, no config.json)")


# ---- native: edgeslm-runner -------------------------------------------------------------------------------

def executorch_cmake_dir() -> Path:
    try:
        import executorch
    except ImportError:
        raise EdgeSLMError("the native runner needs the executorch wheel (pip install executorch==1.5.1)") from None
    path = Path(list(executorch.__path__)[0]) / "share" / "cmake"
    if not (path / "executorch-config.cmake").is_file():
        raise EdgeSLMError(f"the executorch wheel has no CMake package at {path}")
    return path


def native_build_dir() -> Path:
    from importlib import metadata

    from .loading import cache_dir

    h = hashlib.sha256()
    for rel in RUNNER_SOURCES:
        h.update((REPO / rel).read_bytes())
    h.update(metadata.version("executorch").encode())
    return cache_dir() / "native" / h.hexdigest()[:12]


def build_native_runner(progress=None) -> Path:
    """Configures and builds edgeslm-runner once per source/ExecuTorch version; -> the binary."""
    build = native_build_dir()
    binary = build / "edgeslm-runner"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise EdgeSLMError(f"building edgeslm-runner needs {tool} (apt-get install -y cmake g++)")
    tmp = build.with_name(build.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ)
    env.pop("ANDROID_NDK", None)  # the host build; the Android one is configured by hand
    steps = [["cmake", "-S", str(REPO), "-B", str(tmp), f"-DCMAKE_PREFIX_PATH={executorch_cmake_dir()}",
              "-DCMAKE_BUILD_TYPE=Release"],
             ["cmake", "--build", str(tmp), "-j", str(os.cpu_count() or 2)]]
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (p.stdout + p.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"building edgeslm-runner failed at {' '.join(cmd[:2])}: " + " | ".join(tail))
    # the binary's rpath points into the wheel, not the build folder, so the folder may move
    shutil.rmtree(build, ignore_errors=True)
    os.replace(tmp, build)
    return binary


def pte_file(folder, manifest: dict) -> Path:
    if manifest.get("program"):
        return Path(folder) / manifest["program"]
    ptes = [rel for rel in manifest.get("files", {}) if rel.endswith(".pte")]
    if not ptes:
        raise EdgeSLMError(f"{folder} holds no .pte file")
    return Path(folder) / ptes[0]


def native_args(folder, manifest: dict) -> list[str]:
    """edgeslm-runner's options besides --model: the program's weights file, when it has one."""
    return ["--data", str(Path(folder) / manifest["weights"])] if manifest.get("weights") else []


def run_native(binary, pte, prompt: list[int], steps: int, runs: int = 1, warmup: int = 0, extra=()) -> tuple[dict, float]:
    cmd = [str(binary), "--model", str(pte), "--tokens", ",".join(map(str, prompt)), "--steps", str(steps),
           "--runs", str(runs), "--warmup", str(warmup), *extra]
    return run_measured(cmd, timeout=1800)


def measure_native(folder, manifest: dict, prompt_tokens: int, decode_tokens: int, runs: int, warmup: int) -> dict:
    binary = build_native_runner()
    prompt = prompt_ids(_vocab(folder, manifest), prompt_tokens)
    result, rss_mb = run_native(binary, pte_file(folder, manifest), prompt, decode_tokens, runs, warmup,
                                native_args(folder, manifest))
    return {"runner": "native: edgeslm-runner (ExecuTorch C++)", "measured": True, "tokens": result["tokens"],
            "figures": {**figures_from_runs(result["runs"], decode_tokens),
                        "peak_memory_mb": {"value": rss_mb, "note": "peak RSS of edgeslm-runner"}}}


# ---- android: the same runner over adb ----------------------------------------------------------------------

def adb_devices() -> list[str]:
    if shutil.which("adb") is None:
        return []
    try:
        p = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in p.stdout.splitlines()[1:] if line.strip().endswith("device")]


def android_runner() -> Path | None:
    """The arm64-v8a edgeslm-runner: $EDGESLM_ANDROID_RUNNER, or build/android/edgeslm-runner."""
    path = Path(os.environ.get("EDGESLM_ANDROID_RUNNER", REPO / "build" / "android" / "edgeslm-runner"))
    return path if path.is_file() else None


def measure_android(serial: str, folder, manifest: dict, prompt_tokens: int, decode_tokens: int, runs: int,
                    warmup: int) -> dict:
    """Pushes the runner and the .pte, runs them on the phone, reads the JSON back. (Untested here: no phone.)"""
    binary = android_runner()
    pte = pte_file(folder, manifest)
    adb = ["adb", "-s", serial]
    for cmd in (adb + ["shell", "mkdir", "-p", ANDROID_DIR], adb + ["push", str(binary), f"{ANDROID_DIR}/"],
                adb + ["push", str(pte), f"{ANDROID_DIR}/model.pte"],
                *([adb + ["push", str(Path(folder) / manifest["weights"]), f"{ANDROID_DIR}/model.ptd"]]
                  if manifest.get("weights") else []),
                adb + ["shell", "chmod", "755", f"{ANDROID_DIR}/edgeslm-runner"]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()[-200:]}")
    prompt = prompt_ids(_vocab(folder, manifest), prompt_tokens)
    remote = (f"cd {ANDROID_DIR} && LD_LIBRARY_PATH={ANDROID_DIR} ./edgeslm-runner --model model.pte --tokens "
              f"{','.join(map(str, prompt))} --steps {decode_tokens} --runs {runs} --warmup {warmup} "
              + ("--data model.ptd" if manifest.get("weights") else ""))
    p = subprocess.run(adb + ["shell", remote], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"edgeslm-runner on {serial}: {p.stderr.strip()[-300:]}")
    result = json.loads(p.stdout)
    return {"runner": f"android: edgeslm-runner over adb ({serial})", "measured": True, "tokens": result["tokens"],
            "figures": {**figures_from_runs(result["runs"], decode_tokens),
                        "peak_memory_mb": {"value": result["peak_rss_kb"] * 1024 / 1e6,
                                           "note": "the runner's own getrusage on the phone"}}}


# ---- choosing the runners for one artifact on one device ---------------------------------------------------

def runners_for(profile, manifest: dict) -> tuple[list[str], str | None]:
    """-> (measured runner names that reach this device for this artifact, why none does / None)."""
    target = manifest.get("target")
    if profile.kind == "host":
        runners = ["host"]
        if target == "executorch" and shutil.which("cmake") and shutil.which("c++"):
            runners.append("native")
        return runners, None
    if profile.kind == "browser":
        return (["browser"], None) if target == "webgpu" else ([], f"{target} does not run in a browser")
    if profile.kind == "macos":
        if sys.platform == "darwin" and target == "coreml":
            return ["macos"], None
        return [], "no macOS runner here (Core ML predict runs on macOS only)"
    if profile.kind == "android":
        if target != "executorch":
            return [], f"no adb runner for {target} artifacts (edgeslm-runner runs .pte files)"
        serials = adb_devices()
        if not serials:
            return [], "no Android device listed by `adb devices`"
        if android_runner() is None:
            return [], "no arm64-v8a edgeslm-runner (build it with ANDROID_NDK, see CMakeLists.txt)"
        return [f"android:{serials[0]}"], None
    if profile.kind == "ios":
        return [], "no runner reaches an iOS device from here (Core ML predict needs Apple's runtime on the device)"
    return [], f"no runner reaches a {profile.kind} device from here"


def measure(runner: str, folder, manifest: dict, prompt_tokens: int, decode_tokens: int, runs: int,
            warmup: int) -> dict:
    if runner in ("host", "browser", "macos"):
        result = measure_host(folder, prompt_tokens, decode_tokens, runs, warmup, label=runner)
    elif runner == "native":
        result = measure_native(folder, manifest, prompt_tokens, decode_tokens, runs, warmup)
    elif runner.startswith("android:"):
        result = measure_android(runner.split(":", 1)[1], folder, manifest, prompt_tokens, decode_tokens, runs, warmup)
    else:
        raise ValueError(runner)
    size = sum(int(f["bytes"]) for f in manifest.get("files", {}).values())
    result["figures"]["artifact_mb"] = {"value": size / 1e6}
    return result


if __name__ == "__main__":
    # child process of measure_host: python -m edgeslm.latency DIR PROMPT DECODE RUNS WARMUP
    folder, prompt_n, decode_n, runs_n, warmup_n = sys.argv[1], *map(int, sys.argv[2:6])
    try:
        out = _child_measure(folder, prompt_n, decode_n, runs_n, warmup_n)
    except EdgeSLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    json.dump(out, sys.stdout)


def figures_for(folder, manifest, profile, prompt_tokens: int, decode_tokens: int, runs: int, warmup: int,
                batch: int = 1) -> list[dict]:
    """Every result for one artifact on one device: one per measured runner, else one estimate."""
    from .devices import artifact_facts, estimate

    target = manifest["target"]
    if target not in profile.targets:
        return [{"runner": "none", "measured": False, "error": f"{target} artifacts do not run on {profile.name} "
                 f"(its targets: {', '.join(profile.targets)})", "figures": {}}]
    runners, why_not = runners_for(profile, manifest)
    results = []
    for runner in runners if batch == 1 else []:
        try:
            results.append(measure(runner, folder, manifest, prompt_tokens, decode_tokens, runs, warmup))
        except (RuntimeError, OSError) as e:
            results.append({"runner": runner, "measured": True, "error": f"{runner} runner failed: {e}", "figures": {}})
    if not results:
        est = estimate(profile, artifact_facts(folder, manifest), prompt_tokens, decode_tokens, batch)
        note = why_not or ("measured runners are batch 1 (the static KV cache)" if batch > 1 else None)
        size = sum(int(f["bytes"]) for f in manifest.get("files", {}).values())
        results.append({"runner": "estimated (roofline)", "measured": False, "note": note, "basis": est["basis"],
                        "figures": {**{k: {"value": est[k]} for k in ("ttft_ms", "decode_tok_s", "peak_memory_mb")},
                                    "artifact_mb": {"value": size / 1e6}}})
    return results


# The one verdict vocabulary of budget checks (check, deploy, the report):
#   pass        a measured figure within its budget
#   fail        a measured figure outside its budget, an estimate outside it, or a run that failed
#   unverified  an estimate within its budget: a roofline is a ceiling, not a measurement
#   reported    a figure with no budget to judge (the host profile without a budget file)
VERDICTS = ("pass", "fail", "unverified", "reported")


def judge(result: dict, budgets: dict) -> list[dict]:
    """One row per figure; a measured figure is judged on its median."""
    from .devices import BUDGETS

    if result.get("error"):
        return [{"figure": "runs", "value": None, "budget": None, "verdict": "fail", "why": result["error"]}]
    rows = []
    for key, (direction, unit, _) in BUDGETS.items():
        fig = result["figures"].get(key)
        if fig is None:
            continue
        value = fig.get("median", fig.get("value"))
        budget = budgets.get(key)
        if budget is None:
            verdict = "reported"
        else:
            ok = value is not None and not math.isnan(value) and (value <= budget if direction == "max" else value >= budget)
            verdict = "fail" if not ok else ("pass" if result.get("measured") else "unverified")
        rows.append({"figure": key, "unit": unit, "value": value, "p90": fig.get("p90"), "budget": budget,
                     "direction": direction, "verdict": verdict})
    return rows


def verdicts_pass(rows, allow_estimates: bool = False) -> bool:
    """True when every row passed or was only reported; `unverified` counts only with allow_estimates."""
    allowed = {"pass", "reported"} | ({"unverified"} if allow_estimates else set())
    return all(r["verdict"] in allowed for r in rows)
