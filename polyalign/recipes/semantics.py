"""How much the RLOO/GRPO semantics change the outcome: the quickstart task under every `algo.preset`.

Each preset (paper, grpo, dr_grpo, trl_rloo, openrlhf_rloo, verl_rloo; docs/presets.md) trains stories260K
against the built-in sentiment reward model with the same seeds, budget and hyper-parameters (kl_coef, lr,
k = 4): only the semantic options differ. For each run, on held-out prompts with greedy decoding: reward,
KL to the start, completion length and the win-rate against the starting policy (the reward model judges;
ties count 1/2). The table gives the mean and the standard deviation over seeds.

    polyalign repro semantics [--seeds 0 1 2] [--steps 30] [--jobs 2] [--out runs/semantics] [--algo.kl_coef=0.1]

Writes results.json, table.md and semantics.png into the output folder.
"""

from __future__ import annotations

import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from polyalign.config import RunConfig, load_config
from polyalign.config_algo import PRESETS
from polyalign.files import atomic_write_json, atomic_write_text

# A reduced quickstart budget: 30 steps x 8 prompts x 4 completions of up to 32 tokens, one thread a run.
BUDGET = [
    "--rollout.prompts_per_step=8",
    "--rollout.max_new_tokens=32",
    "--eval.max_new_tokens=32",
    "--eval.num_prompts=32",
    "--model.threads=1",
    '--rollout.stop_strings=["."]',
]
QUIET = [
    "--eval.every=0",
    "--output.progress=false",
    "--output.report=false",
    "--output.checkpoint_every=0",
    "--output.sample_every=0",
]
METRICS = ("reward", "kl", "length", "win_rate")


def preset_config(preset: str, seed: int, steps: int, run_dir: Path, overrides: list[str]) -> RunConfig:
    """The quickstart config under `preset`, with the reduced budget; `overrides` come last and win."""
    run = [f"--algo.preset={preset}", f"--train.seed={seed}", f"--train.steps={steps}"]
    return load_config("quickstart", [*BUDGET, *QUIET, *run, f"--output.run_dir={run_dir}", *overrides])


def run_preset(preset: str, seed: int, steps: int, out: Path, overrides: list[str]) -> dict:
    """Train one preset and evaluate it greedily against the starting policy: per-prompt lists."""
    from polyalign.recipes.back_to_basics import greedy_eval
    from polyalign.train.online import train_loop
    from polyalign.train.run import setup_run

    start = time.perf_counter()
    run_dir = out / f"{preset}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a repro starts afresh; it is not resumable
    cfg = preset_config(preset, seed, steps, run_dir, overrides)
    run = setup_run(cfg)
    train_loop(run)
    prompts = run.eval_prompts.prompts[: cfg.eval.num_prompts]
    score = lambda p, c: run.score(p, c)[0]  # noqa: E731
    stop, max_new = cfg.rollout.stop_strings, cfg.eval.max_new_tokens
    result = greedy_eval(run.policy, run.ref, run.tokenizer, score, prompts, max_new, stop)
    seconds = time.perf_counter() - start
    mean = statistics.fmean(result["reward"])
    print(f"[semantics] {preset} seed {seed}: held-out reward {mean:.3f} ({seconds:.0f} s)", flush=True)
    return {"preset": preset, "seed": seed, **result, "seconds": seconds}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per preset: the mean and the standard deviation over seeds of each run's mean; first the
    starting policy's row (greedy, so the same in every run: KL 0, win-rate 50)."""
    rows = []
    if runs and "start_reward" in runs[0]:
        start = {
            "preset": "start",
            "seeds": 0,
            "reward": statistics.fmean(runs[0]["start_reward"]),
            "kl": 0.0,
        }
        start |= {"length": statistics.fmean(runs[0]["start_length"]), "win_rate": 50.0}
        rows.append(start | {f"{m}_std": 0.0 for m in METRICS})
    for preset in dict.fromkeys(r["preset"] for r in runs):
        per_seed = {m: [] for m in METRICS}
        for r in (r for r in runs if r["preset"] == preset):
            per_seed["reward"].append(statistics.fmean(r["reward"]))
            per_seed["kl"].append(statistics.fmean(r["kl"]))
            per_seed["length"].append(statistics.fmean(r["length"]))
            per_seed["win_rate"].append(100 * statistics.fmean(r["wins"]))
        row = {"preset": preset, "seeds": len(per_seed["reward"])}
        for m, values in per_seed.items():
            row[m] = statistics.fmean(values)
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def format_table(rows: list[dict], title: str) -> str:
    """A Markdown table: mean ± std over seeds."""
    lines = [title, "", "| preset | reward | KL | length | win-rate vs start (%) |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in ("reward", "kl")]
        cells += [
            f"{r['length']:.1f} ± {r['length_std']:.1f}",
            f"{r['win_rate']:.1f} ± {r['win_rate_std']:.1f}",
        ]
        lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Four bar panels (reward, KL, length, win-rate), one bar per preset with the seeds' std as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    names = [r["preset"] for r in rows]
    for ax, m, label in zip(
        axes, METRICS, ("held-out reward", "KL to start", "length (tokens)", "win-rate %")
    ):
        ax.bar(names, [r[m] for r in rows], yerr=[r[m + "_std"] for r in rows], capsize=3, color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cli_semantics(
    seeds: list[int], steps: int | None, out: str, overrides: list[str], presets=None, jobs: int = 1
) -> int:
    presets, steps, out_dir = list(presets or PRESETS), steps or 30, Path(out)
    preset_config(presets[0], seeds[0], steps, out_dir, overrides)  # a bad override fails before any run
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(p, s, steps, out_dir / "runs", overrides) for s in seeds for p in presets]
    print(
        f"[semantics] {len(presets)} presets x seeds {seeds}: {steps} steps each, {jobs} at a time",
        flush=True,
    )
    start = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(run_preset, *zip(*tasks)))
    else:
        runs = [run_preset(*t) for t in tasks]
    seconds = time.perf_counter() - start
    rows = summarize(runs)
    title = (
        f"Semantics on the quickstart task: {steps} steps x 8 prompts x k=4, seeds {seeds}, {seconds:.0f} s"
    )
    table = format_table(rows, title)
    print(table)
    atomic_write_text(out_dir / "table.md", table + "\n")
    plot(rows, out_dir / "semantics.png")
    info = {"steps": steps, "seeds": seeds, "overrides": overrides, "seconds": seconds}
    atomic_write_json(out_dir / "results.json", {**info, "table": rows, "runs": runs})
    return 0
