"""Where a rollout's time goes: HFEngine.generate on the benchmark models (benchmarks/workloads.py), per step.

Prints, for each size: seconds per generate (16 rows = 4 prompts x 4 samples, 64 new tokens), milliseconds
per decode step ((t64 - t1) / 63, so the prefill is left out), the weight-read floor (bytes of weights over
the memory bandwidth measured by a large tensor copy: a decode step must read every weight once), and with
--profile a torch.profiler table of one generate's ops (self CPU time).

    PYTHONPATH=. python benchmarks/decode_profile.py --size small --threads 2 [--profile]

To compare two checkouts, run it alternately with PYTHONPATH set to each (the machine's load changes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), the best of `repeats`."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def timed_generate(engine, prompts, tokens: int, seed: int) -> float:
    from polyalign.types import Sampling

    start = time.perf_counter()
    engine.generate(
        prompts, wl.SAMPLES_PER_PROMPT, Sampling(max_new_tokens=tokens, temperature=1.0, seed=seed)
    )
    return time.perf_counter() - start


def measure(size: str, repeats: int, profile: bool, static: bool | None) -> dict:
    import torch

    from polyalign.rollout.hf import HFEngine

    model, tokenizer = wl.build_model(size, verbose=False), wl.build_tokenizer()
    prompts = wl.rloo_prompts(wl.PROMPTS_PER_STEP, tokenizer=tokenizer)
    options = {} if static is None else {"static_decode": static}  # older checkouts lack the option
    engine = HFEngine(model, tokenizer, add_special_tokens=False, **options)
    timed_generate(engine, prompts, 8, 0)  # warm-up
    full = [timed_generate(engine, prompts, wl.MAX_NEW_TOKENS, i) for i in range(repeats)]
    one = [timed_generate(engine, prompts, 1, i) for i in range(repeats)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "size": size,
        "generate_s": statistics.median(full),
        "prefill_s": statistics.median(one),
        "decode_step_ms": 1000 * (statistics.median(full) - statistics.median(one)) / (wl.MAX_NEW_TOKENS - 1),
        "weight_mb": weight_bytes / 1e6,
    }
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            timed_generate(engine, prompts, 16, 0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "small", "both"), default="both")
    parser.add_argument("--threads", type=int, default=wl.NUM_THREADS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one generate")
    parser.add_argument("--static", type=int, default=None, help="HFEngine static_decode (1 / 0)")
    args = parser.parse_args()
    import torch

    import polyalign

    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"polyalign from {Path(polyalign.__file__).parent}; threads {args.threads}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    for size in ("tiny", "small") if args.size == "both" else (args.size,):
        r = measure(size, args.repeats, args.profile, None if args.static is None else bool(args.static))
        floor_ms = 1000 * r["weight_mb"] * 1e6 / bandwidth
        print(f"{size}: generate {r['generate_s']:.3f} s, prefill+1 {r['prefill_s']:.3f} s, decode step "
              f"{r['decode_step_ms']:.2f} ms, weights {r['weight_mb']:.1f} MB, weight-read floor "
              f"{floor_ms:.2f} ms/step; load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
