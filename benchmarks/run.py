"""Side-by-side speed benchmark: TRL and polyalign on the same workload, in interleaved pairs (TRL, polyalign,
TRL, polyalign, ...; 3 pairs by default).

Each run is its own process (`common.run_isolated`), so peak RSS is per run; the 1-minute load average is
recorded before and after every run. Every number is a median over the pairs: s/step per library and the
TRL/polyalign ratio of each pair (the pair's two runs saw about the same load). The machine is recorded
with it (`common.machine`: CPU model, cores, a measured 2048x2048 fp32 matmul GFLOP/s and memcpy GB/s, the
OpenMP environment), and with 3 pairs or more the row goes into RESULTS.md, in that machine's table.

    python benchmarks/run.py --workload rloo --size tiny      # 3 pairs; --pairs N, --steps N
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import results_md  # noqa: E402
import workloads as wl  # noqa: E402

SCRIPTS = {
    ("trl", "rloo"): "trl_rloo.py",
    ("trl", "dpo"): "trl_dpo.py",
    ("polyalign", "rloo"): "polyalign_rloo.py",
    ("polyalign", "dpo"): "polyalign_dpo.py",
}
LIBS = ("trl", "polyalign")
RESULTS = HERE / "RESULTS.md"


def run_interleaved(
    workload: str,
    size: str,
    pairs: int,
    extra: dict[str, list[str]],
    libs: tuple[str, ...] = LIBS,
    partial: Path | None = None,
) -> list[dict]:
    """`pairs` rounds of one TRL run then one polyalign run; returns every result line in run order, each
    with its round and the load before it (also rewritten to `partial` after each run, so a crash keeps
    what was measured)."""
    results = []
    for round_ in range(pairs):
        for lib in libs:
            args = ["--size", size, *extra.get(lib, [])]
            load_before = common.load_average()
            result = common.run_isolated(str(HERE / SCRIPTS[(lib, workload)]), args)
            result["round"], result["load_before"] = round_, load_before
            results.append(result)
            if partial is not None:
                partial.write_text(json.dumps({"runs": results}, indent=1))
            print(
                f"  pair {round_ + 1}/{pairs} {lib:9s} {result['median_s_per_step']:.3f} s/step "
                f"(load {load_before} -> {result['load']})",
                flush=True,
            )
    return results


def pair_ratios(results: list[dict]) -> list[float]:
    """TRL s/step / polyalign s/step of each round that has both."""
    by_round = {(r["round"], r["lib"]): r["median_s_per_step"] for r in results}
    rounds = sorted({r["round"] for r in results})
    return [
        round(by_round[i, "trl"] / by_round[i, "polyalign"], 3)
        for i in rounds
        if (i, "trl") in by_round and (i, "polyalign") in by_round
    ]


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def summarize(results: list[dict]) -> dict:
    """Per library: medians over runs of s/step, tokens/s, peak RSS and every phase; the loads (before, after)
    of every run; with both libraries, the TRL/polyalign ratio of each pair and their median."""
    out: dict = {}
    for lib in LIBS:
        runs = [r for r in results if r["lib"] == lib]
        if not runs:
            continue
        rate_key = "gen_tokens_per_s" if runs[0].get("gen_tokens_per_s") is not None else "train_tokens_per_s"
        phases = sorted({p for r in runs for p in r["breakdown_s"]}, key=_phase_order)
        out[lib] = {
            "median_s_per_step": _median(runs, "median_s_per_step"),
            "runs_s_per_step": [r["median_s_per_step"] for r in runs],
            rate_key: _median(runs, rate_key),
            "peak_rss_mib": _median(runs, "peak_rss_mib"),
            "breakdown_s": {p: statistics.median(r["breakdown_s"].get(p, 0.0) for r in runs) for p in phases},
            "versions": runs[0]["versions"],
            "load": [r["load_before"] for r in runs] + [runs[-1]["load"]],
        }
    out["loads"] = [(r["load_before"], r["load"]) for r in results]
    if "trl" in out and "polyalign" in out:
        out["pair_ratios"] = pair_ratios(results)
        out["median_ratio"] = round(statistics.median(out["pair_ratios"]), 3)
    return out


def _phase_order(name: str) -> int:
    order = [*common.PHASES, "other"]
    return order.index(name) if name in order else len(order)


def print_table(summary: dict, workload: str, size: str) -> None:
    trl, pa = summary.get("trl"), summary.get("polyalign")
    libs = [(n, s) for n, s in (("TRL", trl), ("polyalign", pa)) if s]
    rate_key = next(k for k in libs[0][1] if k.endswith("tokens_per_s"))
    print(f"\n{workload} / {size}")
    print(
        f"{'':28s}" + "".join(f"{n:>14s}" for n, _ in libs) + ("   TRL/polyalign" if len(libs) == 2 else "")
    )

    def line(label: str, values: list[float], fmt: str, ratio: bool) -> None:
        text = f"{label:28s}" + "".join(format(v, fmt).rjust(14) for v in values)
        if ratio and len(values) == 2 and values[1]:
            text += f"{values[0] / values[1]:15.2f}x"
        print(text)

    line("median s/step", [s["median_s_per_step"] for _, s in libs], ".3f", True)
    line(rate_key.replace("_", " "), [s[rate_key] for _, s in libs], ".0f", False)
    line("peak RSS MiB", [s["peak_rss_mib"] for _, s in libs], ".0f", True)
    phases = sorted({p for _, s in libs for p in s["breakdown_s"]}, key=_phase_order)
    for phase in phases:
        line(f"  {phase} s", [s["breakdown_s"].get(phase, 0.0) for _, s in libs], ".3f", False)
    for name, s in libs:
        print(
            f"{name} runs s/step: {s['runs_s_per_step']}, loads (before each run, after the last) {s['load']}"
        )
        print(f"{name} versions: {s['versions']}")
    if "pair_ratios" in summary:
        print(f"TRL/polyalign per pair: {summary['pair_ratios']}, median {summary['median_ratio']:.2f}x")


def record(summary: dict, machine: dict, path: Path = RESULTS) -> None:
    """Put the summary's row into `path`, in the table of `machine`."""
    import time

    versions = summary["trl"]["versions"]
    line = results_md.row(summary, machine, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    info = (
        ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; OpenMP env {machine['omp_env'] or 'unset'}"
    )
    path.write_text(results_md.update(path.read_text(), machine, line, info))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="TRL vs polyalign, interleaved pairs (BENCHMARKS.md workloads)"
    )
    parser.add_argument("--size", choices=sorted(wl.MODEL_SIZES), default="tiny")
    parser.add_argument("--workload", choices=("rloo", "dpo"), default="rloo")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (TRL, polyalign) pairs")
    parser.add_argument("--steps", type=int, default=wl.STEPS, help="optimizer steps per run")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/WORKLOAD_SIZE.json)"
    )
    parser.add_argument("--only", choices=LIBS, help="run one library only")
    parser.add_argument("--polyalign-args", default="", help="extra arguments for the polyalign script")
    parser.add_argument("--no-record", action="store_true", help="do not write the row into RESULTS.md")
    args = parser.parse_args()
    if args.pairs < 1 or args.steps <= wl.WARMUP_STEPS:
        parser.error(f"need --pairs >= 1 and --steps > {wl.WARMUP_STEPS}")
    libs = (args.only,) if args.only else LIBS
    machine = common.machine(threads=wl.NUM_THREADS)
    print(f"{args.workload} {args.size}: {args.pairs} interleaved pairs; machine {machine}", flush=True)
    steps = ["--steps", str(args.steps)]
    extra = {"polyalign": [*steps, *args.polyalign_args.split()], "trl": steps}
    out = args.out or HERE / "results" / f"{args.workload}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run_interleaved(args.workload, args.size, args.pairs, extra, libs, partial=out)
    summary = {"workload": args.workload, "size": args.size, **summarize(results)}
    print_table(summary, args.workload, args.size)
    out.write_text(json.dumps({"summary": summary, "machine": machine, "runs": results}, indent=1))
    print(f"\nwrote {out}")
    if "median_ratio" in summary and args.pairs >= 3 and not args.no_record:
        record(summary, machine)
        print(f"recorded in {RESULTS}")
    elif not args.no_record:
        print(f"not recorded in {RESULTS}: that needs both libraries and --pairs >= 3")


if __name__ == "__main__":
    main()
