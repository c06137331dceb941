"""Co-load benchmark: polyalign's RLOO step on a quiet machine vs beside one competing CPU-bound process, for
each thread setting (threads, OpenMP wait policy, libgomp spin count), interleaved.

The workload is the RLOO step of BENCHMARKS.md (`polyalign_rloo.build_run` + `polyalign.train.online.
train_step`, tiny model by default). The competitor is one pure-Python busy loop (`while True: pass`: one
always-runnable thread, no memory traffic), started before the timed process and killed after it. Every
run is its own process with its own environment, because the OpenMP runtime reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT once, when torch is imported. A run stops starting steps after --budget seconds, so a
setting that collapses under load costs at most about a budget plus one step.

Order per round: for each setting, quiet then loaded (A quiet, A loaded, B quiet, B loaded, ...). Printed
per setting: the median s/step over rounds quiet and loaded, the slowdown (loaded / quiet, same setting;
and loaded / the best quiet setting), and the 1-minute load average before each run.

    python benchmarks/coload.py                       # defaults: tiny, 3 rounds, 4 settings (~5 min)
    python benchmarks/coload.py --settings t1 t2-passive --rounds 5 --size small
    python benchmarks/coload.py --nice -20             # as root on a shared machine: ahead of the other work
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# name -> (torch threads, interop threads or 0 = torch's default, environment for the OpenMP runtime)
SETTINGS = {
    "t2-default": (2, 0, {}),  # libgomp's default: a waiting thread spins ~300k iterations, then sleeps
    "t2-passive": (2, 0, {"OMP_WAIT_POLICY": "PASSIVE"}),  # a waiting thread sleeps at once (futex)
    "t2-spin10k": (2, 0, {"GOMP_SPINCOUNT": "10000"}),
    "t2-spin30k": (2, 0, {"GOMP_SPINCOUNT": "30000"}),
    "t2-spin3k": (2, 0, {"GOMP_SPINCOUNT": "3000"}),
    "t2-active": (2, 0, {"OMP_WAIT_POLICY": "ACTIVE"}),  # spins (almost) forever
    "t2-passive-interop1": (2, 1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t1": (1, 0, {}),  # one thread: torch runs no OpenMP team at all
    "t1-passive": (1, 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
DEFAULT_SETTINGS = ("t2-default", "t2-spin3k", "t2-passive", "t1")
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
COMPETITOR = "while True: pass"


def child(size: str, threads: int, interop: int, steps: int, warmup: int, budget: float) -> None:
    """Run up to `steps` RLOO steps (stopping after `budget` s once past warm-up), printing a JSON line when
    the run is built and after every step (so that a parent that kills it keeps the steps done)."""
    import tempfile

    import torch

    if interop:
        torch.set_num_interop_threads(interop)
    import polyalign_rloo

    from polyalign.train import online

    with tempfile.TemporaryDirectory() as tmp:
        run = polyalign_rloo.build_run(size, steps, threads, tmp, "fast")
        print(json.dumps({"built": time.time(), "threads": torch.get_num_threads()}), flush=True)
        start = time.perf_counter()
        for step in range(steps):
            t0 = time.perf_counter()
            online.train_step(run, step)
            print(json.dumps({"step": step, "s": time.perf_counter() - t0, "end": time.time()}), flush=True)
            if step >= warmup and time.perf_counter() - start > budget:
                break
    print(json.dumps({"done": time.time()}), flush=True)


def step_times(stdout: str, killed_at: float | None) -> tuple[list[float], bool]:
    """The step times a child printed; when it was killed mid-step, the unfinished step counts with the time
    it had run (a lower bound), and the flag says so."""
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    times = [ln["s"] for ln in lines if "step" in ln]
    if killed_at is None or any("done" in ln for ln in lines):  # finished (perhaps killed on its way out)
        return times, False
    if not lines:  # killed before its model was built: no step time
        return [], True
    last = max((ln.get("end", ln.get("built", 0.0)) for ln in lines), default=killed_at)
    return [*times, killed_at - last], True


def run_one(setting: str, loaded: bool, args: argparse.Namespace) -> dict:
    """One child run under `setting`, with or without the competitor; returns its median s/step (steps after
    the first), the loads before and after, and `censored` when it was stopped at --timeout."""
    threads, interop, env_extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS} | env_extra
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", "--size", args.size, "--threads", str(threads)]
    cmd += ["--interop", str(interop), "--steps", str(args.steps), "--budget", str(args.budget)]
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if loaded else None
    load_before, killed_at = common.load_average(), None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        stdout = proc.stdout
        if proc.returncode != 0:
            raise RuntimeError(f"coload child {setting} failed:\n{proc.stderr[-3000:]}")
    except subprocess.TimeoutExpired as stopped:
        killed_at = time.time()
        stdout = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    times, censored = step_times(stdout, killed_at)
    kept = times[1:] or times
    return {
        "setting": setting, "loaded": loaded, "median_s_per_step": statistics.median(kept) if kept else None,
        "step_times_s": [round(t, 4) for t in times], "censored": censored,
        "load_before": load_before, "load": common.load_average(),
    }  # fmt: skip


def renice(nice: int) -> str | None:
    """This process and its children (the timed runs and the competitor) at `nice`, and so is their
    scheduler autogroup (Linux with sched_autogroup_enabled schedules sessions against each other first,
    so a plain nice would only rank processes of this session). Returns the autogroup's previous nice."""
    os.nice(nice)
    group = Path("/proc/self/autogroup")
    try:
        before = group.read_text().split()[-1]
        group.write_text(str(nice))
        return before
    except (OSError, IndexError) as err:
        print(f"autogroup not reniced ({err}); nice applies within this session only", flush=True)
        return None


def summarize(runs: list[dict], settings: list[str]) -> list[dict]:
    """Per setting: median s/step quiet and loaded over rounds, slowdowns, loads seen, and whether a run in
    the group was stopped at --timeout (its s/step is then a lower bound)."""
    group = lambda s, loaded: [r for r in runs if r["setting"] == s and r["loaded"] == loaded]
    med = lambda rs: (
        statistics.median(x)
        if (x := [r["median_s_per_step"] for r in rs if r["median_s_per_step"]])
        else float("nan")
    )
    best_quiet = min(med(group(s, False)) for s in settings)
    rows = []
    for s in settings:
        quiet, loaded = med(group(s, False)), med(group(s, True))
        rows.append({
            "setting": s, "quiet_s": round(quiet, 4), "loaded_s": round(loaded, 4),
            "slowdown": round(loaded / quiet, 2), "slowdown_vs_best_quiet": round(loaded / best_quiet, 2),
            "censored": any(r["censored"] for r in group(s, True) + group(s, False)),
            "quiet_loads": [r["load_before"] for r in group(s, False)],
            "loaded_loads": [r["load_before"] for r in group(s, True)],
        })  # fmt: skip
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'setting':22s}{'quiet s/step':>13s}{'loaded s/step':>14s}{'slowdown':>10s}{'vs best quiet':>15s}"
          "   load before (quiet | loaded runs)")  # fmt: skip
    for r in rows:
        print(f"{r['setting']:22s}{r['quiet_s']:13.3f}{r['loaded_s']:14.3f}{r['slowdown']:9.2f}x"
              f"{r['slowdown_vs_best_quiet']:14.2f}x   {r['quiet_loads']} | {r['loaded_loads']}"
              + ("  (a run hit --timeout: lower bound)" if r["censored"] else ""))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="RLOO step time quiet vs beside one CPU-bound process")
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every setting")
    parser.add_argument("--steps", type=int, default=6, help="most steps per run (the first is warm-up)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds after which a run stops stepping")
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds after which a run is stopped")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the timed runs and the competitor, and of their autogroup (-20 as root: ahead of "
        "the other work on a shared machine, an approximation of a quiet one)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "coload.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--interop", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.size, args.threads, args.interop, args.steps, 1, args.budget)
    if args.rounds < 1 or args.steps < 2:
        parser.error("need --rounds >= 1 and --steps >= 2")
    group_nice = renice(args.nice) if args.nice else None
    print(f"co-load, {args.size}: {args.rounds} rounds x {args.settings}, competitor `{COMPETITOR}`, "
          f"{os.cpu_count()} cores, nice {args.nice}, load {common.load_average()}", flush=True)  # fmt: skip
    try:
        runs = []
        for round_ in range(args.rounds):
            for setting in args.settings:
                for loaded in (False, True):
                    r = run_one(setting, loaded, args)
                    runs.append({**r, "round": round_})
                    print(f"  round {round_ + 1} {setting:20s} {'loaded' if loaded else 'quiet ':6s} "
                          f"{'>=' if r['censored'] else ''}{r['median_s_per_step'] or float('nan'):.3f} s/step ({len(r['step_times_s'])} steps, "
                          f"load {r['load_before']} -> {r['load']})", flush=True)  # fmt: skip
    finally:
        if group_nice is not None:  # the autogroup is the whole session's: give its priority back
            Path("/proc/self/autogroup").write_text(group_nice)
    rows = summarize(runs, args.settings)
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "summary": rows,
                "runs": runs,
                "args": {k: str(v) for k, v in vars(args).items()},
                "machine": common.machine(),
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
