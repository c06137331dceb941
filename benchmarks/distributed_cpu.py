"""torchrun on CPU: seconds per optimizer step and peak RSS per process, 1 process x 2 threads against
2 processes x 1 thread (DDP and FSDP over gloo), for offline DPO and online RLOO.

Model: the "small" benchmark Llama (27.8M parameters, fp32, random init, seed 0) saved with its benchmark
tokenizer to a temporary folder (`lora_memory.save_model_dir`). Each run is a real `polyalign train`
command line in fresh processes:
- 1 process: `python distributed_cpu.py --worker DIR train ARGS --model.threads=2`, OMP_NUM_THREADS=2;
- 2 processes: `python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_cpu.py --worker
  DIR train ARGS --model.threads=1 --model.parallel={ddp,fsdp}`, OMP_NUM_THREADS=1.
The worker (`--worker`) imports the trainers, notes its peak RSS, runs `polyalign.cli.main(ARGS)` and writes
its own peak RSS (VmHWM) to DIR/rank<RANK>.json: the peak of every process, not only of the largest.
s/step is the median of `time/step` in the run's metrics.jsonl without the first step. Next to each run,
`polyalign plan CONFIG --nproc N --json` (no weights loaded) gives the planned tensor bytes per process.

Cases (the same global batch on 1 and 2 processes):
- dpo: configs/offline/dpo.yaml, 6 steps of 8 pairs, no warmup, on the first 48 rows of the built-in English
  DPO demo (`lora_memory.DPO_ROWS`; the reference log-probs are precomputed before training);
- rloo: the online defaults (RLOO, k 4, 2 updates per batch, KL to a reference), lexicon_sentiment reward,
  4 steps of 8 prompts x 32 new tokens.

Run (about 3 minutes on 2 cores): python benchmarks/distributed_cpu.py   # table + results/distributed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import lora_memory  # noqa: E402
import workloads as wl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "results" / "distributed_cpu.json"
MIB = 2**20
SIZE = "small"
COMMON_OVERRIDES = ["--eval.every=0", "--output.report=false", "--output.progress=false"]
CASES = {  # name -> (config file or None for the online defaults, overrides)
    "dpo": (
        "configs/offline/dpo.yaml",
        ["--train.steps=6", "--train.warmup_steps=0", "--train.batch_size=8"],
    ),
    "rloo": (
        None,
        [
            "--reward.functions={lexicon_sentiment: 1.0}",
            "--train.steps=4",
            "--rollout.prompts_per_step=8",
            "--rollout.max_new_tokens=32",
        ],
    ),
}
LAYOUTS = {  # name -> (processes, threads per process, model.parallel or None)
    "1 proc x 2 threads": (1, 2, None),
    "2 proc DDP x 1 thread": (2, 1, "ddp"),
    "2 proc FSDP x 1 thread": (2, 1, "fsdp"),
}


def vm_hwm_mib() -> float:
    """This process's peak RSS (VmHWM), in MiB.

    Not ru_maxrss: a child spawned by subprocess (vfork + exec) starts with its parent's peak RSS there.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM line in /proc/self/status (Linux only)")


def worker(rss_dir: Path, argv: list[str]) -> int:
    """Run `polyalign <argv>` in this process and write this rank's peak RSS (MiB) to `rss_dir`."""
    import polyalign.train.offline  # noqa: F401  (the import baseline: trainers loaded, no model yet)
    import polyalign.train.online  # noqa: F401
    from polyalign.cli import main as polyalign_main

    import_mib = vm_hwm_mib()
    code = polyalign_main(argv)
    rank = int(os.environ.get("RANK", "0"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "rank": rank,
        "peak_rss_mib": round(vm_hwm_mib(), 1),
        "import_rss_mib": round(import_mib, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }
    (rss_dir / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    return code


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, __file__]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
    ]


def _train_args(case: str, layout: str, model_dir: Path, data: Path, run_dir: Path) -> list[str]:
    """The `polyalign train ...` arguments of one case on one layout."""
    config, overrides = CASES[case]
    _, threads, parallel = LAYOUTS[layout]
    args = [
        "train",
        *([config] if config else []),
        f"--model.policy={model_dir}",
        f"--output.run_dir={run_dir}",
    ]
    args += [*COMMON_OVERRIDES, *overrides, f"--model.threads={threads}"]
    args += [f"--data.train={data}"] if config else []
    args += [f"--model.parallel={parallel}"] if parallel else []
    return args


def _env(threads: int) -> dict[str, str]:
    # MALLOC_MMAP_THRESHOLD_ as in lora_memory.py: freed tensors leave the RSS, so peaks follow live memory.
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS=str(threads),
        MALLOC_MMAP_THRESHOLD_=str(64 * 1024),
    )


def _s_per_step(run_dir: Path) -> tuple[float, list[float]]:
    """Median `time/step` without the first step, and all step times."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    times = [r["time/step"] for r in rows if "time/step" in r]
    return round(common.median_after_warmup(times, 1), 3), [round(t, 3) for t in times]


def run_case(case: str, layout: str, model_dir: Path, data: Path, work: Path) -> dict:
    """One case on one layout in fresh processes: s/step, per-rank peak RSS, wall seconds."""
    nproc, threads, _ = LAYOUTS[layout]
    slug = f"{case}-{nproc}-{LAYOUTS[layout][2] or 'single'}"
    run_dir, rss_dir = work / slug, work / f"{slug}-rss"
    rss_dir.mkdir()
    args = _train_args(case, layout, model_dir, data, run_dir)
    argv = [*_launcher(nproc), "--worker", str(rss_dir), *args]
    log = work / f"{slug}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(threads), stdout=out, stderr=subprocess.STDOUT)
        code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{log.read_text()[-4000:]}")
    ranks = [json.loads((rss_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    s_per_step, step_times = _s_per_step(run_dir)
    return {
        "s_per_step": s_per_step,
        "step_times_s": step_times,
        "wall_s": round(wall, 1),
        "ranks": ranks,
        "peak_rss_mib_max_rank": max(r["peak_rss_mib"] for r in ranks),
        "argv": [a.replace(str(work), "<tmp>") for a in args],
    }


def plan_case(case: str, layout: str, model_dir: Path, data: Path) -> dict:
    """`polyalign plan` for the same run: planned bytes per process (no weights loaded)."""
    nproc, _, _ = LAYOUTS[layout]
    args = [a for a in _train_args(case, layout, model_dir, data, Path("unused"))[1:] if "run_dir" not in a]
    argv = [sys.executable, "-m", "polyalign.cli", "plan", *args, "--nproc", str(nproc), "--json"]
    done = subprocess.run(argv, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    plan = json.loads(done.stdout)
    models = {
        m["role"]: m["bytes_weights"] + m["bytes_grads"] + m["bytes_optimizer"]
        for m in plan["models"]
        if not m["setup_only"]
    }
    return {
        "bytes_peak": plan["bytes_peak"],
        "bytes_model_state": sum(models.values()),
        "bytes_model_state_by_role": models,
        "phases": plan["phases"],
        "bytes_activations": plan["bytes_activations"],
        "bytes_fsdp_buffer": plan["bytes_fsdp_buffer"],
        "bytes_fsdp_generation": plan["bytes_fsdp_generation"],
        "bytes_ddp_buckets": plan["bytes_ddp_buckets"],
        "notes": plan["notes"],
    }


def _table(results: dict[str, dict]) -> str:
    head = f"{'case':<6}{'layout':<24}{'s/step':>8}{'vs 1 proc':>10}{'RSS/rank MiB':>18}{'above imports':>15}"
    lines = [head + f"{'plan state MiB':>16}{'plan peak MiB':>15}{'wall s':>8}"]
    for case, by_layout in results.items():
        base = by_layout[next(iter(LAYOUTS))]["run"]["s_per_step"]
        for layout, r in by_layout.items():
            run, plan = r["run"], r["plan"]
            rss = " / ".join(f"{x['peak_rss_mib']:.0f}" for x in run["ranks"])
            above = " / ".join(f"{x['peak_rss_mib'] - x['import_rss_mib']:.0f}" for x in run["ranks"])
            lines.append(
                f"{case:<6}{layout:<24}{run['s_per_step']:>8.3f}{run['s_per_step'] / base:>10.2f}{rss:>18}"
                f"{above:>15}{plan['bytes_model_state'] / MIB:>16.0f}{plan['bytes_peak'] / MIB:>15.0f}"
                f"{run['wall_s']:>8.1f}"
            )
    return "\n".join(lines)


def run_all(out: Path) -> dict:
    """Every case on every layout; prints the table and writes `out`."""
    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="distributed_cpu_") as tmp:
        work = Path(tmp)
        model_dir = lora_memory.save_model_dir(work / f"model-{SIZE}", SIZE)
        data = lora_memory._dpo_subset(work / "dpo_pairs.json")
        for case in CASES:
            results[case] = {}
            for layout in LAYOUTS:
                plan = plan_case(case, layout, model_dir, data)
                results[case][layout] = {"run": run_case(case, layout, model_dir, data, work), "plan": plan}
                print(f"{case} / {layout}: {results[case][layout]['run']['s_per_step']} s/step", flush=True)
    print(_table(results))
    summary = {
        "workload": f"polyalign train on the {SIZE} benchmark Llama ({wl.EXPECTED_PARAMS[SIZE]:,} parameters)",
        "dpo_data": f"first {lora_memory.DPO_ROWS} rows of builtin:dpo-demo-en",
        "layouts": {k: {"nproc": n, "threads": t, "parallel": p} for k, (n, t, p) in LAYOUTS.items()},
        "s_per_step": "median of time/step in metrics.jsonl without the first step",
        "cpu_count": os.cpu_count(),
        "versions": common.versions("torch", "transformers", "peft"),
        "malloc_mmap_threshold": str(64 * 1024),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    run_all(args.out)


if __name__ == "__main__":
    main()
