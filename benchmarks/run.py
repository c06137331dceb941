"""Side-by-side speed benchmark: TRL and polyalign on the same workload, interleaved (A B A B ...).

Each run is its own process (`common.run_isolated`), so peak RSS is per run; the two libraries alternate so
that their ratio comes from one session at one load. Prints a table (median s/step, generated or trained
tokens/s, peak RSS, ratio, per-phase breakdown, versions) and writes every run's result line to a JSON file.

    python benchmarks/run.py --size tiny --workload rloo --repeats 3 --out benchmarks/results/rloo_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import workloads as wl  # noqa: E402

SCRIPTS = {
    ("trl", "rloo"): "trl_rloo.py",
    ("trl", "dpo"): "trl_dpo.py",
    ("polyalign", "rloo"): "polyalign_rloo.py",
    ("polyalign", "dpo"): "polyalign_dpo.py",
}
LIBS = ("trl", "polyalign")


def run_interleaved(
    workload: str,
    size: str,
    repeats: int,
    extra: dict[str, list[str]],
    libs: tuple[str, ...] = LIBS,
    partial: Path | None = None,
) -> list[dict]:
    """`repeats` rounds of one TRL run then one polyalign run; returns every result line in run order
    (also rewritten to `partial` after each run, so a crash keeps what was measured)."""
    results = []
    for round_ in range(repeats):
        for lib in libs:
            args = ["--size", size, *extra.get(lib, [])]
            load_before = common.load_average()
            result = common.run_isolated(str(HERE / SCRIPTS[(lib, workload)]), args)
            result["round"], result["load_before"] = round_, load_before
            results.append(result)
            if partial is not None:
                partial.write_text(json.dumps({"runs": results}, indent=1))
            print(
                f"  round {round_ + 1}/{repeats} {lib:9s} {result['median_s_per_step']:.3f} s/step "
                f"(load {load_before} -> {result['load']})",
                flush=True,
            )
    return results


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def summarize(results: list[dict]) -> dict:
    """Per library: medians over runs of s/step, tokens/s, peak RSS and every phase; ratio TRL / polyalign."""
    out = {}
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
    if len(out) == 2:
        out["speedup_trl_over_polyalign"] = round(
            out["trl"]["median_s_per_step"] / out["polyalign"]["median_s_per_step"], 2
        )
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

    def row(label: str, values: list[float], fmt: str, ratio: bool) -> None:
        line = f"{label:28s}" + "".join(format(v, fmt).rjust(14) for v in values)
        if ratio and len(values) == 2 and values[1]:
            line += f"{values[0] / values[1]:15.2f}x"
        print(line)

    row("median s/step", [s["median_s_per_step"] for _, s in libs], ".3f", True)
    row(rate_key.replace("_", " "), [s[rate_key] for _, s in libs], ".0f", False)
    row("peak RSS MiB", [s["peak_rss_mib"] for _, s in libs], ".0f", True)
    phases = sorted({p for _, s in libs for p in s["breakdown_s"]}, key=_phase_order)
    for phase in phases:
        row(f"  {phase} s", [s["breakdown_s"].get(phase, 0.0) for _, s in libs], ".3f", False)
    for name, s in libs:
        print(f"{name} runs s/step: {s['runs_s_per_step']}, load {s['load']}")
        print(f"{name} versions: {s['versions']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="TRL vs polyalign, interleaved (BENCHMARKS.md workloads)")
    parser.add_argument("--size", choices=sorted(wl.MODEL_SIZES), default="tiny")
    parser.add_argument("--workload", choices=("rloo", "dpo"), default="rloo")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (TRL, polyalign)")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/WORKLOAD_SIZE.json)"
    )
    parser.add_argument("--only", choices=LIBS, help="run one library only")
    parser.add_argument("--polyalign-args", default="", help="extra arguments for the polyalign script")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    libs = (args.only,) if args.only else LIBS
    print(f"{args.workload} {args.size}: {args.repeats} interleaved rounds, load {os.getloadavg()[0]:.2f}")
    extra = {"polyalign": args.polyalign_args.split()}
    out = args.out or HERE / "results" / f"{args.workload}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run_interleaved(args.workload, args.size, args.repeats, extra, libs, partial=out)
    summary = summarize(results)
    print_table(summary, args.workload, args.size)
    out.write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
