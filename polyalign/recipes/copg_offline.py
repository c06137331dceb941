"""The CoPG paper's LLM experiment (arXiv:2406.19185, Sec. 6; SPEC 4.5) in miniature, on the quickstart task.

The paper trains offline on TL;DR pairs re-scored by a reward model (RM) and compares CoPG, DPO and IPO over
beta sweeps by the RM reward of generations on held-out prompts (a low-beta collapse shows there, not in the
validation loss). Here:
1. `build_offline_set`: k completions per training prompt (`builtin:stories`) sampled ONCE from the starting
   stories260K policy, scored by the built-in sentiment RM, cached as scored JSONL {prompt, completion,
   reward}; nothing is regenerated during training. Same for `builtin:stories-eval` (held-out pairs).
2. `train_offline` per (method, beta, seed): DPO/IPO on RM-ranked best-vs-worst pairs (the paper re-ranks
   preferences with its RM), CoPG on unranked pairs with both scores; for the default k=2 all three see
   exactly the same pairs. Same steps, batch, lr and schedule everywhere.
3. `evaluate_policy`: greedy completions of the final policy on the held-out prompts, their RM reward (mean
   and standard error over prompts x seeds), k1 KL to the start, win-rate against the start's greedy
   completion (ties 1/2), next to the trainer's held-out pair loss/accuracy. Best beta = highest reward.

Betas, scaled to this setting: the start's two samples of a prompt differ in RM score by ~2.5 on average, so
CoPG's fit beta * (a - a') = R - R' (a = log pi/pi_ref of a 48-token completion; log pi_ref ~ -68) asks for
log-ratio gaps of ~8 / 25 / 80 / 250 nats at beta 0.3 / 0.1 / 0.03 / 0.01, and IPO's target margin
1/(2 beta) is 5 / 17 / 50 / 167 nats at 0.1 / 0.03 / 0.01 / 0.003: the grids (subsets of the paper's) run
from mild to absurd. The tiny model needs several epochs to move, so the default is 8 epochs (120 steps),
not the paper's 2. Whatever ordering comes out is printed as it is.

    polyalign repro copg-offline [--steps N] [--seeds 0] [--out runs/copg-offline]
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

METHODS = {"copg": "CoPG", "dpo": "DPO", "ipo": "IPO"}
DEFAULT_BETAS = {
    "copg": (0.01, 0.03, 0.1, 0.3),
    "dpo": (0.01, 0.03, 0.1, 0.3),
    "ipo": (0.003, 0.01, 0.03, 0.1),
}
PAPER_BEST_BETA = {"copg": 0.06, "dpo": 0.1, "ipo": 0.01}  # SPEC 4.5, TL;DR with Llama2-7B
# Scored completions -> pairs (polyalign.data.preference.pairs_from_scored): DPO/IPO get the RM's best vs
# worst, CoPG disjoint unranked pairs (for k=2 both are the single pair of each prompt).
PAIRING = {"copg": "random_pairs", "dpo": "best_worst", "ipo": "best_worst"}


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides the seeds and the beta grid (n_prompts: the first n prompts)."""

    policy: str = "stories260K"
    reward_model: str = "stories260K-sentiment-rm"
    train_prompts: str = "builtin:stories"
    eval_prompts: str = "builtin:stories-eval"
    n_prompts: int = 240
    k: int = 2  # completions sampled per prompt for the offline sets
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling the offline sets; evaluation is greedy
    steps: int = 120
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 12
    schedule: str = "cosine"
    threads: int = 1  # torch threads: a tiny model gains little from a second, shared core


# ---------------------------------------------------------------- 1. the offline set


def _load_scorer(name: str):
    from polyalign.rewards import build_reward

    return build_reward(f"model:{name}")


def build_offline_set(
    n_prompts: int,
    k: int,
    seed: int,
    out: str | Path,
    *,
    prompts: str = "builtin:stories",
    policy: str = "stories260K",
    reward_model: str = "stories260K-sentiment-rm",
    max_new_tokens: int = 48,
    temperature: float = 1.0,
) -> Path:
    """Sample k completions for each of the first n prompts from the starting policy, score them with the
    reward model and write scored JSONL rows {prompt, completion, reward, language, generator, scorer, seed,
    sample, finished}. The file is a cache: when `out` exists and its `<out>.meta.json` records the same
    arguments it is returned untouched; other arguments are an error (delete the file to rebuild)."""
    from polyalign.data.prompts import load_prompts
    from polyalign.files import atomic_write_json, atomic_write_text
    from polyalign.models import load_policy
    from polyalign.rollout.hf import HFEngine
    from polyalign.types import Sampling

    out, meta_path = Path(out), Path(f"{out}.meta.json")
    meta = {"prompts": prompts, "n_prompts": n_prompts, "k": k, "seed": seed, "policy": policy}
    meta |= {"reward_model": reward_model, "max_new_tokens": max_new_tokens, "temperature": temperature}
    if out.exists():
        found = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if found != meta:
            raise FileExistsError(f"{out} was built with {found}, not {meta}; delete it and its .meta.json")
        return out
    if k < 2:
        raise ValueError(f"k must be >= 2 completions per prompt to form pairs, got {k}")
    available = load_prompts(prompts).prompts
    if not 1 <= n_prompts <= len(available):
        raise ValueError(f"n_prompts must be in 1..{len(available)} for {prompts!r}, got {n_prompts}")
    model, tokenizer = load_policy(policy)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    rollout = HFEngine(model, tokenizer).generate(available[:n_prompts], n=k, sampling=sampling)
    row_prompts = [p for p in available[:n_prompts] for _ in range(k)]  # group-major, like the rollout
    rewards = _load_scorer(reward_model)(row_prompts, rollout.completions).tolist()
    provenance = {"language": "en", "generator": policy, "scorer": reward_model, "seed": seed}
    rows = [
        {"prompt": p, "completion": c, "reward": r, **provenance, "sample": i % k, "finished": bool(f)}
        for i, (p, c, r, f) in enumerate(zip(row_prompts, rollout.completions, rewards, rollout.finished))
    ]
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_json(meta_path, meta)
    return out


def offline_sets(s: Settings, seed: int, data_dir: Path) -> tuple[Path, Path]:
    """(training set, held-out set) for one seed, built once and cached under `data_dir`."""
    from polyalign.data.prompts import load_prompts

    common = {"k": s.k, "seed": seed, "policy": s.policy, "reward_model": s.reward_model}
    common |= {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature}
    tag, n_eval = f"k{s.k}-t{s.max_new_tokens}-seed{seed}.jsonl", len(load_prompts(s.eval_prompts))
    train = data_dir / f"train-n{s.n_prompts}-{tag}"
    held = data_dir / f"eval-n{n_eval}-{tag}"
    return (
        build_offline_set(s.n_prompts, out=train, prompts=s.train_prompts, **common),
        build_offline_set(n_eval, out=held, prompts=s.eval_prompts, **common),
    )


# ---------------------------------------------------------------- 2. training


def method_config(method: str, beta: float, s: Settings, seed: int, train: Path, held: Path, run_dir: Path):
    """The OfflineRunConfig of one (method, beta, seed) run: identical optimisation for every method."""
    from polyalign.config import from_dict
    from polyalign.config_offline import OfflineRunConfig

    data = {"train": str(train), "eval": str(held), "fmt": "scored", "pair_strategy": PAIRING[method]}
    t = {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "warmup_steps": s.warmup_steps}
    output = {"run_dir": str(run_dir), "checkpoint_every": 0, "keep_last": 1, "sample_every": 0}
    return from_dict(
        OfflineRunConfig,
        {
            "model": {"policy": s.policy, "threads": s.threads},
            "data": data | {"max_length": s.max_new_tokens + 80, "max_prompt_length": 64},
            "loss": {"name": method, "beta": beta},
            "train": t | {"schedule": s.schedule, "seed": seed},
            "eval": {"every": 0},
            "output": output | {"progress": False, "report": False},
        },
    )


def train_method(cfg) -> tuple[torch.nn.Module, dict]:
    """Train one run afresh (a repro is not resumable); return the final policy and the trainer summary."""
    from polyalign.models import load_policy
    from polyalign.train.offline import train_offline

    shutil.rmtree(cfg.output.run_dir, ignore_errors=True)
    summary = train_offline(cfg)
    return load_policy(summary["model"])[0].eval(), summary


# ---------------------------------------------------------------- 3. evaluation


@torch.inference_mode()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int):
    from polyalign.rollout.hf import HFEngine
    from polyalign.types import Sampling

    return HFEngine(model, tokenizer).generate(prompts, 1, Sampling(max_new_tokens, temperature=0.0))


@torch.inference_mode()
def evaluate_policy(policy, ref, tokenizer, score, prompts: list[str], max_new_tokens: int, start_rewards):
    """Greedy completions of `policy` on `prompts`: per prompt, their reward, k1 KL to `ref` (log pi - log
    pi_ref of the completion) and win against the start's rewards `start_rewards` (P,) (ties count 1/2)."""
    from polyalign import losses
    from polyalign.logprobs import completion_logprobs

    out = greedy_completions(policy, tokenizer, prompts, max_new_tokens)
    ids, masks = (out.prompt_ids, out.prompt_mask), (out.completion_ids, out.completion_mask)
    ref_logprobs = completion_logprobs(ref, *ids, *masks)  # (P, T)
    kl = losses.sequence_kl(out.logprobs, ref_logprobs, out.completion_mask, kind="k1")  # (P,)
    rewards = score(prompts, out.completions)  # (P,)
    wins = (rewards > start_rewards).float() + 0.5 * (rewards == start_rewards).float()
    return {
        "reward": rewards.tolist(),
        "kl": kl.tolist(),
        "wins": wins.tolist(),
        "example": out.completions[0],
    }


# ---------------------------------------------------------------- 4. the table


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    if not values:
        raise ValueError("mean_se: no values")
    n, mean = len(values), sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, beta) of the run records, pooling prompts x seeds: reward (mean, se), KL, win-rate
    vs start (%), the trainer's final held-out pair loss and accuracy (mean over seeds)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["beta"]), []).append(r)
    rows = []
    for (method, beta), group in sorted(
        groups.items(), key=lambda g: (list(METHODS).index(g[0][0]), g[0][1])
    ):
        pooled = {key: [x for r in group for x in r[key]] for key in ("reward", "kl", "wins")}
        reward, se = mean_se(pooled["reward"])
        row = {"method": method, "beta": beta, "reward": reward, "reward_se": se}
        row["kl"], row["win_rate"] = mean_se(pooled["kl"])[0], 100 * mean_se(pooled["wins"])[0]
        for key in ("eval_loss", "eval_accuracy"):
            row[key] = sum(r[key] for r in group) / len(group)
        rows.append(row)
    return rows


def best_betas(rows: list[dict]) -> dict[str, dict]:
    """Per method, the row with the highest held-out reward (ties: the lower KL, then the smaller beta)."""
    best: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (-r["reward"], r["kl"], r["beta"])):
        best.setdefault(row["method"], {key: row[key] for key in ("beta", "reward", "reward_se")})
    return {m: best[m] for m in METHODS if m in best}


def format_table(rows: list[dict], baseline: dict, best: dict[str, dict], header: str) -> str:
    head = (
        f"{'method':<7}{'beta':>7}{'reward':>9}{'± se':>7}{'KL':>8}{'win%':>7}{'val loss':>11}{'val acc':>9}"
    )
    start = (
        f"{'start':<7}{'-':>7}{baseline['reward']:>9.3f}{baseline['reward_se']:>7.3f}{0.0:>8.2f}{50.0:>7.1f}"
    )
    lines = [header, head, "-" * 65, start]
    for r in rows:
        mark = " *" if best.get(r["method"], {}).get("beta") == r["beta"] else ""
        cells = f"{r['reward']:>9.3f}{r['reward_se']:>7.3f}{r['kl']:>8.2f}{r['win_rate']:>7.1f}"
        val = f"{r['eval_loss']:>11.4g}{r['eval_accuracy']:>9.3f}"
        lines.append(f"{METHODS[r['method']]:<7}{r['beta']:>7g}{cells}{val}{mark}")
    picks = ", ".join(f"{METHODS[m]} {b['beta']:g} (paper {PAPER_BEST_BETA[m]:g})" for m, b in best.items())
    return "\n".join([*lines, f"best beta (* above): {picks}"])


def plot_sweeps(rows: list[dict], baseline: dict, path: str | Path) -> Path:
    """Held-out reward vs beta (log axis), one line per method with standard-error bars, the start dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in METHODS.items():
        if mine := [r for r in rows if r["method"] == method]:
            x, y, se = ([r[key] for r in mine] for key in ("beta", "reward", "reward_se"))
            ax.errorbar(x, y, yerr=se, marker="o", capsize=3, label=label)
    ax.axhline(baseline["reward"], color="gray", linestyle="--", label="start")
    ax.set(xscale="log", xlabel="beta", ylabel="held-out reward (greedy, RM)", title="Offline CoPG/DPO/IPO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- 5. the sweep and the command


def check_betas(betas: dict | None) -> dict[str, tuple[float, ...]]:
    """None = DEFAULT_BETAS; otherwise exactly the methods given, each with a non-empty list of betas > 0."""
    if betas is None:
        return dict(DEFAULT_BETAS)
    if not isinstance(betas, dict) or not betas:
        raise ValueError(f"betas must be a non-empty dict {{method: [beta, ...]}}, got {betas!r}")
    out = {}
    for method, grid in betas.items():
        if method not in METHODS:
            raise ValueError(f"betas: unknown method {method!r}; choose from {sorted(METHODS)}")
        values = [grid] if isinstance(grid, int | float) else list(grid)
        if not values or any(isinstance(b, bool) or not isinstance(b, int | float) or b <= 0 for b in values):
            raise ValueError(f"betas[{method!r}] must be a non-empty list of numbers > 0, got {grid!r}")
        out[method] = tuple(sorted({float(b) for b in values}))
    return out


def run_one(s: Settings, method: str, beta: float, seed: int, sets: tuple[Path, Path], ctx: dict, out: Path):
    """Train one (method, beta, seed) and evaluate it on the held-out prompts; returns its run record."""
    t0 = time.perf_counter()
    run_dir = out / "runs" / f"{method}-beta{beta:g}-seed{seed}"
    policy, summary = train_method(method_config(method, beta, s, seed, *sets, run_dir))
    args = (ctx["ref"], ctx["tokenizer"], ctx["score"], ctx["prompts"], s.max_new_tokens, ctx["start"])
    record = {"method": method, "beta": beta, "seed": seed, **evaluate_policy(policy, *args)}
    final = summary.get("eval_final") or {}
    record["eval_loss"], record["eval_accuracy"] = (
        final.get("eval/loss", math.nan),
        final.get("eval/accuracy", math.nan),
    )
    record["train_pairs"], record["run_dir"] = summary["data"]["train"]["pairs"], str(run_dir)
    return record | {"seconds": time.perf_counter() - t0}


def run_sweep(s: Settings, seeds: list[int], betas: dict[str, tuple[float, ...]], out: Path) -> dict:
    """Build (or reuse) the offline sets, train and evaluate every (method, beta, seed); return results."""
    from polyalign.data.prompts import load_prompts
    from polyalign.models import load_policy

    torch.set_num_threads(s.threads)
    ref, tokenizer = load_policy(s.policy)
    ctx = {"ref": ref.eval(), "tokenizer": tokenizer, "score": _load_scorer(s.reward_model)}
    ctx["prompts"] = load_prompts(s.eval_prompts).prompts
    start = greedy_completions(ref, tokenizer, ctx["prompts"], s.max_new_tokens)
    ctx["start"] = ctx["score"](ctx["prompts"], start.completions)  # (P,)
    runs, data = [], {}
    for seed in seeds:
        sets = offline_sets(s, seed, out / "data")
        data[str(seed)] = {"train": str(sets[0]), "eval": str(sets[1])}
        for method, grid in betas.items():
            for beta in grid:
                print(
                    f"[copg-offline] {METHODS[method]} beta={beta:g} seed {seed}: {s.steps} steps", flush=True
                )
                runs.append(run_one(s, method, beta, seed, sets, ctx, out))
    rows = summarize(runs)
    reward, se = mean_se(ctx["start"].tolist())
    baseline = {"reward": reward, "reward_se": se, "example": start.completions[0]}
    grids = {m: list(g) for m, g in betas.items()}
    common = {"settings": asdict(s), "seeds": list(seeds), "betas": grids, "baseline": baseline}
    return common | {"table": rows, "runs": runs, "data": data}


def run_repro(s: Settings, seeds: list[int], betas: dict | None, out: str | Path) -> dict:
    """The whole repro: sweep, print the table, write DIR/results.json and DIR/reward_vs_beta.png."""
    from polyalign.files import atomic_write_json

    if not seeds:
        raise ValueError("seeds: give at least one seed")
    grid, out_dir, t0 = check_betas(betas), Path(out), time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_sweep(s, list(seeds), grid, out_dir)
    results |= {"best": best_betas(results["table"]), "paper_best_beta": PAPER_BEST_BETA}
    results["wall_seconds"] = time.perf_counter() - t0
    header = (
        f"CoPG offline in miniature: {s.policy}, {s.n_prompts} prompts x {s.k} samples scored by "
        f"{s.reward_model}; {s.steps} steps x {s.batch_size} pairs, lr {s.lr:g}; seeds {list(seeds)}; "
        f"greedy reward on {s.eval_prompts}"
    )
    print(format_table(results["table"], results["baseline"], results["best"], header))
    atomic_write_json(out_dir / "results.json", results)
    plot_sweeps(results["table"], results["baseline"], out_dir / "reward_vs_beta.png")
    print(f"wrote {out_dir}/results.json and reward_vs_beta.png ({results['wall_seconds']:.0f} s)")
    return results


def cli_copg_offline(out: str, steps: int | None, seeds: list[int], betas: dict | None) -> int:
    """`polyalign repro copg-offline [--steps N] [--seeds 0] [--out DIR]`: the default settings (4m44s
    measured on a shared 2-core CPU), `steps` overriding the number of optimizer steps. Returns 0."""
    s = Settings()
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        s = replace(s, steps=steps, warmup_steps=min(s.warmup_steps, steps // 10))
    run_repro(s, seeds, betas, out)
    return 0
