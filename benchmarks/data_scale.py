"""Cost of a DPO run against the size of its data file: does it grow with the file or with the work?

    python benchmarks/data_scale.py --pairs 10000 100000 1000000 [--steps 2] [--repeats 1] [--keep]

For each size it writes a JSONL file of synthetic preference pairs ({prompt, chosen, rejected}, about 500
bytes a pair, i.e. 200k pairs ~ 100 MB, the size of a real preference set's train split), then runs the real
command a user would, in a fresh process:

    polyalign train configs/offline/dpo.yaml --data.train=FILE --data.eval_fraction=0.001 --eval.every=0 \
        --train.steps=2 --train.warmup_steps=0

and prints wall seconds, CPU seconds (user + system: less sensitive than wall time to other work on a shared
machine) and peak RSS (the child's ru_maxrss) beside the load average. A second run of the same file shows what
the on-disk caches save (tokens and reference log-probs, kept under the temporary folder's cache/, so the
first run is always cold). Files go to a temporary folder (removed unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a little dog cat girl boy park ball happy sad ran jumped played found tree sun rain home mom "
    "friend big small red blue green kind said loved wanted looked went saw day night story time"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_pairs(path: Path, n: int, seed: int = 0) -> int:
    """n pairs of ~500 bytes each; returns the file size in bytes."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "prompt": f"Story {i}: " + _sentence(rng, 20),
                "chosen": _sentence(rng, 28),
                "rejected": _sentence(rng, 28),
            }
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def run_once(data: Path, run_dir: Path, steps: int, cache: Path, root: Path = ROOT) -> dict:
    """One `polyalign train` of the checkout `root` in a fresh process: wall and CPU seconds, peak RSS (MiB),
    exit status. A checkout from before the tokens cache (no data.cache_dir) runs without the flag."""
    knows_cache = "cache_dir" in (root / "polyalign" / "config_offline.py").read_text()
    command = [
        sys.executable, "-m", "polyalign.cli", "train", str(root / "configs" / "offline" / "dpo.yaml"),
        f"--data.train={data}", "--data.eval_fraction=0.001", "--eval.every=0", f"--train.steps={steps}",
        "--train.warmup_steps=0", f"--output.run_dir={run_dir}", "--output.report=false",
        "--output.progress=false", "--output.checkpoint_every=0",
    ] + ([f"--data.cache_dir={cache}"] if knows_cache else [])  # fmt: skip
    # A small wrapper process reports the peak of its own child, so each run's peak is its own.
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print('PEAK_KIB', u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); "
        "sys.exit(code)"
    )
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command], cwd=root, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    usage = [line.split()[1:] for line in done.stderr.splitlines() if line.startswith("PEAK_KIB")]
    peak, cpu = (int(usage[-1][0]) / 1024, float(usage[-1][1])) if usage else (float("nan"), float("nan"))
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(peak),
        "ok": done.returncode == 0,
        "error": [x for x in done.stderr.splitlines() if not x.startswith("PEAK_KIB")][-1:]
        if done.returncode
        else "",
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (the 2nd reuses caches)")
    parser.add_argument("--keep", action="store_true", help="keep the data files and run folders")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to run (e.g. one from before)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="polyalign-data-scale-"))
    print(f"machine: {os.cpu_count()} cores; results below; files in {work}")
    print("| pairs | file MB | run | wall s | CPU s | peak RSS MiB | load | ok |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for n in sorted(args.pairs):
        data = work / f"pairs_{n}.jsonl"
        size = write_pairs(data, n)
        for repeat in range(args.repeats):
            result = {"pairs": n, "file_mb": round(size / 1e6, 1), "run": repeat + 1}
            result |= run_once(data, work / f"run_{n}_{repeat}", args.steps, work / "cache", args.root)
            results.append(result)
            print(
                f"| {n} | {result['file_mb']} | {repeat + 1} | {result['wall_s']} | {result['cpu_s']} "
                f"| {result['peak_rss_mib']} "
                f"| {result['load']:.2f} | {'yes' if result['ok'] else result['error']} |",
                flush=True,
            )
    print(json.dumps(results))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
