"""Back to Basics (arXiv:2402.14740) Table 1 in miniature, on the quickstart task.

Every method gets the same sample budget (completions drawn from a policy over the run) and starts from the
same stories260K policy; the reward is the built-in sentiment reward model. Methods: RLOO k=2 and k=4,
REINFORCE with a moving-average baseline, vanilla PG, PPO, RAFT k=4 (online, `train_online`), and DPO
(offline: pairs of the starting policy's own samples, best vs worst by reward-model score, the same budget).
For each run: final held-out reward (greedy), KL to the start, and the win-rate of the final policy's greedy
completion against the starting policy's, judged by the reward model (ties count 1/2), with a bootstrap 95%
interval over prompts x seeds. The ordering that comes out is printed as it is.

    polyalign repro back-to-basics --seeds 0 1 2 --out runs/back-to-basics
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from polyalign.config import RunConfig, load_config
from polyalign.recipes.evaluate.metrics import bootstrap_interval

BUDGET_PER_STEP = 32  # completions per rollout batch, identical for every method
METHODS = {  # name -> (algorithm, samples per prompt)
    "RLOO (k=4)": ("rloo", 4),
    "RLOO (k=2)": ("rloo", 2),
    "RAFT (k=4)": ("raft", 4),
    "REINFORCE w/ baseline": ("reinforce", 1),
    "Vanilla PG": ("vanilla_pg", 1),
    "PPO": ("ppo", 1),
    "DPO": ("dpo", 2),
}


def method_config(base: RunConfig, algo: str, k: int, seed: int, steps: int, out: Path) -> RunConfig:
    rollout = replace(base.rollout, samples_per_prompt=k, prompts_per_step=BUDGET_PER_STEP // k)
    updates = (
        base.algo.updates_per_batch if rollout.prompts_per_step % base.algo.updates_per_batch == 0 else 1
    )
    return replace(
        base,
        rollout=rollout,
        algo=replace(base.algo, name=algo, updates_per_batch=updates),
        train=replace(base.train, seed=seed, steps=steps),
        eval=replace(base.eval, every=0),
        output=replace(
            base.output, run_dir=str(out), progress=False, report=False, checkpoint_every=0, sample_every=0
        ),
    )


@torch.inference_mode()
def greedy_eval(policy, ref, tokenizer, score, prompts: list[str], max_new_tokens: int, stop=()) -> dict:
    """Greedy completions of the final and the starting policy (cut at `stop` strings), their scores and
    the final policy's KL."""
    from polyalign import losses
    from polyalign.logprobs import completion_logprobs
    from polyalign.rollout.hf import HFEngine
    from polyalign.types import Sampling

    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=tuple(stop))
    final = HFEngine(policy, tokenizer).generate(prompts, n=1, sampling=greedy)
    start = HFEngine(ref, tokenizer).generate(prompts, n=1, sampling=greedy)
    ref_logprobs = completion_logprobs(
        ref, final.prompt_ids, final.prompt_mask, final.completion_ids, final.completion_mask
    )
    kl = losses.sequence_kl(final.logprobs, ref_logprobs, final.completion_mask, kind="k1")
    final_scores, start_scores = score(prompts, final.completions), score(prompts, start.completions)
    wins = (final_scores > start_scores).float() + 0.5 * (final_scores == start_scores).float()
    return {
        "reward": final_scores.tolist(),
        "kl": kl.tolist(),
        "wins": wins.tolist(),
        "length": final.completion_lengths.tolist(),
        "start_reward": start_scores.tolist(),
        "start_length": start.completion_lengths.tolist(),
        "completion": final.completions[0],
    }


def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampled over prompts x seeds)."""
    x = torch.tensor(values, dtype=torch.float64)
    return bootstrap_interval(lambda idx: x[idx].mean(-1), len(x), n_resamples=n_boot, seed=seed)


def run_method(algo: str, k: int, base: RunConfig, seed: int, steps: int, out: Path) -> dict:
    from polyalign.recipes.dpo_on_samples import train_dpo_on_samples
    from polyalign.train.online import train_loop
    from polyalign.train.run import setup_run

    online_algo = "rloo" if algo == "dpo" else algo  # DPO reuses the rollout settings, not the online loop
    run_dir = out / f"{algo}-k{k}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a repro starts afresh; it is not resumable
    run = setup_run(method_config(base, online_algo, k, seed, steps, run_dir))
    train_dpo_on_samples(run) if algo == "dpo" else train_loop(run)
    prompts = run.eval_prompts.prompts[: base.eval.num_prompts]
    score = lambda p, c: run.score(p, c)[0]  # noqa: E731
    return greedy_eval(run.policy, run.ref, run.tokenizer, score, prompts, base.eval.max_new_tokens)


def cli_back_to_basics(seeds: list[int], steps: int | None, out: str, overrides: list[str]) -> int:
    base = load_config(None, ["--algo.kl_coef=0.05", *overrides])
    steps = steps or 80
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name, (algo, k) in METHODS.items():
        for seed in seeds:
            print(
                f"[back-to-basics] {name} seed {seed}: {steps} steps x {BUDGET_PER_STEP} completions",
                flush=True,
            )
            results.setdefault(name, []).append(run_method(algo, k, base, seed, steps, out_dir / "runs"))
    table = summarize(results)
    print(format_table(table, steps, seeds))
    from polyalign.files import atomic_write_json

    atomic_write_json(
        out_dir / "results.json",
        {"steps": steps, "seeds": seeds, "budget_per_step": BUDGET_PER_STEP, "table": table, "runs": results},
    )
    return 0


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        wins = [w for r in runs for w in r["wins"]]
        reward = [x for r in runs for x in r["reward"]]
        kl = [x for r in runs for x in r["kl"]]
        lo, hi = bootstrap_ci(wins)
        rows.append(
            {
                "method": name,
                "reward": sum(reward) / len(reward),
                "kl": sum(kl) / len(kl),
                "win_rate": 100 * sum(wins) / len(wins),
                "ci": (100 * lo, 100 * hi),
            }
        )
    return sorted(rows, key=lambda r: -r["win_rate"])


def format_table(rows: list[dict], steps: int, seeds: list[int]) -> str:
    lines = [
        f"Back to Basics in miniature: {steps} steps x {BUDGET_PER_STEP} completions, seeds {seeds}",
        f"{'method':<24}{'reward':>9}{'KL':>8}{'win-rate vs start':>20}  95% CI",
        "-" * 72,
    ]
    for r in rows:
        lines.append(
            f"{r['method']:<24}{r['reward']:>9.3f}{r['kl']:>8.2f}{r['win_rate']:>19.1f}%  "
            f"[{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]"
        )
    return "\n".join(lines)
