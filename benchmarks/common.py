"""Timing, memory and reporting helpers shared by every benchmark script (TRL and polyalign sides).

Owns: per-step phase timing (`PhaseTimer`), the median-after-warmup rule, peak RSS, library versions, the
one-JSON-line result format and running one benchmark per subprocess (so peak RSS is per run). Imports
no transformers/TRL at module level so that it does not inflate the RSS of the side being measured.

Result line (one per run, the last JSON line on stdout):
    {"lib", "workload", "size", "median_s_per_step", "gen_tokens_per_s", "peak_rss_mib", "versions",
     "step_times_s", "breakdown_s", "breakdown_share", "load": "<1-min load average at the end>"}
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata

PHASES = ("generate", "old_logprob_forward", "ref_forward", "policy_forward", "backward", "optimizer")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_after_warmup(values: list[float], warmup: int) -> float:
    """Median of `values` without the first `warmup` entries."""
    kept = values[warmup:]
    if not kept:
        raise ValueError(f"need more than {warmup} values, got {len(values)}")
    return statistics.median(kept)


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` (plus python); missing packages are left out."""
    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class PhaseTimer:
    """Wall-clock time per named phase and per optimizer step.

    `begin_step()` / `end_step()` bracket one optimizer step; `phase(name)` (a context manager) or
    `wrap(fn, name)` attribute time inside it. Nested phases are not subtracted: time them disjointly.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.phase_times: list[dict[str, float]] = []
        self.counters: list[dict[str, float]] = []
        self._start: float | None = None
        self._phases: dict[str, float] = defaultdict(float)
        self._counts: dict[str, float] = defaultdict(float)

    def begin_step(self) -> None:
        self._start = time.perf_counter()
        self._phases, self._counts = defaultdict(float), defaultdict(float)

    def end_step(self) -> None:
        if self._start is None:
            raise RuntimeError("end_step() called without begin_step()")
        self.step_times.append(time.perf_counter() - self._start)
        self.phase_times.append(dict(self._phases))
        self.counters.append(dict(self._counts))
        self._start = None

    def add(self, name: str, seconds: float) -> None:
        self._phases[name] += seconds

    def count(self, name: str, amount: float) -> None:
        self._counts[name] += amount

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wrap(self, fn: Callable, name: str | Callable[..., str]) -> Callable:
        """`fn` timed under `name` (or under `name(*args, **kwargs)` when `name` is a function)."""

        def timed(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            with self.phase(label):
                return fn(*args, **kwargs)

        return timed

    def summary(self, warmup: int) -> dict:
        """Median step time, per-phase medians (s) and shares of the median step, after `warmup` steps."""
        median_step = median_after_warmup(self.step_times, warmup)
        kept = self.phase_times[warmup:]
        names = [p for p in PHASES if any(p in k for k in kept)] + sorted(
            {n for k in kept for n in k} - set(PHASES)
        )
        breakdown = {n: statistics.median(k.get(n, 0.0) for k in kept) for n in names}
        others = [t - sum(k.values()) for t, k in zip(self.step_times[warmup:], kept)]
        breakdown["other"] = statistics.median(others)
        share = {n: round(v / median_step, 3) for n, v in breakdown.items()}
        return {
            "median_s_per_step": round(median_step, 4),
            "step_times_s": [round(t, 4) for t in self.step_times],
            "breakdown_s": {n: round(v, 4) for n, v in breakdown.items()},
            "breakdown_share": share,
        }

    def median_count(self, name: str, warmup: int) -> float:
        return statistics.median(c.get(name, 0.0) for c in self.counters[warmup:])


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def machine(threads: int = 2, repeats: int = 5) -> dict:
    """The machine a benchmark ran on: CPU model (/proc/cpuinfo), cores, the OpenMP variables set, and two
    speeds measured on `threads` torch threads, medians of `repeats`: a 2048x2048 fp32 matmul (GFLOP/s,
    2 n^3 flops) and a 256 MiB tensor copy (GB/s of bytes copied), with the 1-minute load average then."""
    import platform

    import torch

    torch.set_num_threads(threads)

    model = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    a, src = torch.randn(2048, 2048), torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    matmul_s, copy_s = median_time(lambda: a @ a), median_time(lambda: dst.copy_(src))
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_env": " ".join(f"{k}={os.environ[k]}" for k in OMP_ENV if k in os.environ),
        "matmul_2048_gflops": round(2 * 2048**3 / matmul_s / 1e9, 1),
        "memcpy_gb_s": round(src.numel() * 4 / copy_s / 1e9, 1), "load": load_average(),
    }  # fmt: skip


def emit(result: dict) -> None:
    """Print the result as one JSON line (the last line a parent process reads)."""
    result = {**result, "peak_rss_mib": round(peak_rss_mib(), 1), "load": load_average()}
    print(json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict:
    """The last JSON object with a "lib" key in a benchmark's stdout."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "lib" in result:
                return result
    raise ValueError("no benchmark result line in the output:\n" + stdout[-2000:])


def run_isolated(script: str, args: list[str], timeout_s: float = 1800) -> dict:
    """Run `python script *args` in a fresh process (so peak RSS is its own) and return its result line."""
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse_result(proc.stdout)


def run_timed_steps(step_fn, steps: int, timer, profile_step: int | None = None) -> None:
    """Call step_fn(step) for each step between timer.begin_step() and timer.end_step(); with profile_step,
    print a torch.profiler operator table of that step to stderr."""
    import sys

    import torch

    for step in range(steps):
        profiler = None
        if step == profile_step:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        timer.begin_step()
        step_fn(step)
        timer.end_step()
        if profiler is not None:
            profiler.__exit__(None, None, None)
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(f"torch.profiler, optimizer step {step}:\n{table}", file=sys.stderr)
