"""The CoPG toy bandit (Flet-Berliac et al. 2024, arXiv:2406.19185, Sec. 5 and Figure 1), reproduced exactly.

Three arms with rewards R = (2.5, 2, 1); a dataset of n pairs (y ~ mu1, y' ~ mu2), mu1 = (0.1, 0.2, 0.7),
mu2 = (0.05, 0.05, 0.9), sampled once; beta = 0.5; pi_ref uniform. Four methods learn a tabular softmax policy
offline from those pairs with Adam (lr 1e-3, minibatches of 512 pairs reshuffled every epoch, 100 epochs):
- "copg": Eq. 17 with gradient Eq. 19, through `polyalign.losses.copg_loss`.
- "ipo": IPO on one Bradley-Terry preference per pair, P(y > y') = sigmoid(R(y) - R(y')), through
  `polyalign.losses.ipo_loss`.
- "pg": the naive off-policy policy gradient of Eq. 23-24 with b = 0 ("vanilla").
- "pg_value": the same with the exact value baseline b = E_{y~pi}[R(y)] (unregularised R, as in the paper).
The metric is the regret J(pi*) - J(pi), J(pi) = sum_y pi(y) R(y) - beta KL(pi || pi_ref) (Eq. 2, 25),
computed analytically. Since J(pi) = beta ln Z* - beta KL(pi || pi*), the regret also equals
beta KL(pi || pi*).

Choices the paper does not state (SPEC 4.4, [I]), fixed here and recorded in results.json:
- policy: 3 logits initialised at 0 (= pi_ref); float64 throughout;
- IPO tau = beta (= 0.5), i.e. the loss (h - 1/(2 beta))^2 of Azar et al.;
- Adam betas (0.9, 0.999), eps 1e-8 (torch defaults); the last, smaller minibatch of an epoch is kept;
- every method sees the same dataset and the same minibatch order (one shuffling seed);
- "epoch" = one pass over the n pairs; regret is recorded at epoch 0 and after every epoch.

Run: `polyalign repro copg-bandit --epochs 100 --seed 0 --out runs/copg_bandit` (takes seconds on a CPU).
This module knows nothing about language models; the bandit-specific PG surrogates live here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from polyalign.files import atomic_write_json
from polyalign.losses import copg_loss, ipo_loss

REWARDS = (2.5, 2.0, 1.0)
MU1 = (0.1, 0.2, 0.7)
MU2 = (0.05, 0.05, 0.9)
METHODS = ("copg", "ipo", "pg", "pg_value")
METHOD_LABELS = {"copg": "CoPG", "ipo": "IPO", "pg": "PG (b=0)", "pg_value": "PG (value baseline)"}
COPG_FORM = "squared"
_DTYPE = torch.float64


@dataclass(frozen=True)
class BanditPairs:
    """The offline dataset: N pairs of arm indices and one Bradley-Terry preference per pair.

    Shapes: every field (N,) long. chosen/rejected is (y, y') or (y', y) depending on the sampled preference.
    """

    arms: torch.Tensor  # (N,) y ~ mu1
    arms_prime: torch.Tensor  # (N,) y' ~ mu2
    chosen: torch.Tensor  # (N,)
    rejected: torch.Tensor  # (N,)

    def take(self, idx: torch.Tensor) -> BanditPairs:
        """The pairs at positions `idx` (a minibatch)."""
        return BanditPairs(self.arms[idx], self.arms_prime[idx], self.chosen[idx], self.rejected[idx])


def uniform_ref_probs(n_arms: int = 3) -> torch.Tensor:
    """pi_ref: the uniform policy over the arms."""
    return torch.full((n_arms,), 1.0 / n_arms, dtype=_DTYPE)


def optimal_policy(rewards: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """pi* = pi_ref exp(R / beta) / Z* (Appx. A, Eq. 29), the maximiser of J. Shapes: (A,) -> (A,)."""
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=-1)


def regularised_value(
    probs: torch.Tensor, rewards: torch.Tensor, ref_probs: torch.Tensor, beta: float
) -> float:
    """J(pi) = sum_y pi(y) R(y) - beta KL(pi || pi_ref) (Eq. 2), exactly; arms with pi(y) = 0 add 0 to KL."""
    log_ratio = torch.where(probs > 0, torch.log(probs) - torch.log(ref_probs), torch.zeros_like(probs))
    return float((probs * rewards).sum() - beta * (probs * log_ratio).sum())


def regret(probs: torch.Tensor, rewards: torch.Tensor, ref_probs: torch.Tensor, beta: float) -> float:
    """J(pi*) - J(pi) (Eq. 25), >= 0 (up to float rounding, ~1e-16) with equality only at pi*."""
    best = optimal_policy(rewards, ref_probs, beta)
    return regularised_value(best, rewards, ref_probs, beta) - regularised_value(
        probs, rewards, ref_probs, beta
    )


def sample_pairs(
    n_pairs: int, mu1: torch.Tensor, mu2: torch.Tensor, rewards: torch.Tensor, generator: torch.Generator
) -> BanditPairs:
    """Sample the dataset once: y ~ mu1, y' ~ mu2 independently; y preferred w.p. sigmoid(R(y) - R(y'))."""
    arms = torch.multinomial(mu1, n_pairs, replacement=True, generator=generator)  # (N,)
    arms_prime = torch.multinomial(mu2, n_pairs, replacement=True, generator=generator)  # (N,)
    p_first = torch.sigmoid(rewards[arms] - rewards[arms_prime])  # (N,)
    first_wins = torch.rand(n_pairs, generator=generator, dtype=_DTYPE) < p_first
    chosen = torch.where(first_wins, arms, arms_prime)
    rejected = torch.where(first_wins, arms_prime, arms)
    return BanditPairs(arms=arms, arms_prime=arms_prime, chosen=chosen, rejected=rejected)


def pg_surrogate_loss(
    logprobs: torch.Tensor,
    logprobs_prime: torch.Tensor,
    ref_logprobs: torch.Tensor,
    ref_logprobs_prime: torch.Tensor,
    rewards: torch.Tensor,
    rewards_prime: torch.Tensor,
    beta: float,
    baseline: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Naive off-policy PG on pairs (Eq. 23-24): minus the mean over pairs of
    sg(R_beta(y) - b) ln pi(y) + sg(R_beta(y') - b) ln pi(y'),  R_beta(y) = R(y) - beta ln(pi(y)/pi_ref(y)).

    Its gradient is minus Eq. 24. The weights are detached (a score-function estimator), so this is the
    gradient one would use if the pairs came from pi; they come from mu1 x mu2, hence the paper's bias.
    Shapes: all (B,); baseline a scalar (detached here). Returns a scalar.
    """
    weight = (rewards - beta * (logprobs - ref_logprobs) - baseline).detach()
    weight_prime = (rewards_prime - beta * (logprobs_prime - ref_logprobs_prime) - baseline).detach()
    return -(weight * logprobs + weight_prime * logprobs_prime).mean()


# A method maps (policy log-probs (A,), minibatch of pairs, rewards (A,), ref log-probs (A,), beta) to a loss.
MethodLoss = Callable[[torch.Tensor, BanditPairs, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _copg(
    logp: torch.Tensor, b: BanditPairs, rew: torch.Tensor, ref: torch.Tensor, beta: float
) -> torch.Tensor:
    y, yp = b.arms, b.arms_prime
    loss, _ = copg_loss(logp[y], logp[yp], ref[y], ref[yp], rew[y], rew[yp], beta, form=COPG_FORM)
    return loss


def _ipo(
    logp: torch.Tensor, b: BanditPairs, rew: torch.Tensor, ref: torch.Tensor, beta: float
) -> torch.Tensor:
    w, lo = b.chosen, b.rejected
    loss, _ = ipo_loss(logp[w], logp[lo], ref[w], ref[lo], beta)
    return loss


def _pg(
    logp: torch.Tensor, b: BanditPairs, rew: torch.Tensor, ref: torch.Tensor, beta: float
) -> torch.Tensor:
    y, yp = b.arms, b.arms_prime
    return pg_surrogate_loss(logp[y], logp[yp], ref[y], ref[yp], rew[y], rew[yp], beta, baseline=0.0)


def _pg_value(
    logp: torch.Tensor, b: BanditPairs, rew: torch.Tensor, ref: torch.Tensor, beta: float
) -> torch.Tensor:
    y, yp = b.arms, b.arms_prime
    value = (logp.exp() * rew).sum()  # exact E_{y~pi}[R(y)], unregularised (SPEC 4.4)
    return pg_surrogate_loss(logp[y], logp[yp], ref[y], ref[yp], rew[y], rew[yp], beta, baseline=value)


METHOD_LOSSES: dict[str, MethodLoss] = {"copg": _copg, "ipo": _ipo, "pg": _pg, "pg_value": _pg_value}


def train_methods(
    methods: tuple[str, ...],
    pairs: BanditPairs,
    rewards: torch.Tensor,
    beta: float,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    shuffle_seed: int,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Train one tabular softmax policy (logits at 0) per method with Adam, on the same minibatches.

    The policies are the rows of one (M, A) logits table under one Adam: Adam is elementwise and each method's
    loss touches only its row, so this is exactly M independent optimisers, with one backward per minibatch.
    Returns (final probs (M, A), regret per epoch per method: epochs + 1 values, before training then after
    each epoch).
    """
    unknown = [m for m in methods if m not in METHOD_LOSSES]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty tuple of names from {METHODS}, got {methods!r}")
    ref_probs = uniform_ref_probs(rewards.numel())
    ref_logprobs = torch.log(ref_probs)
    logits = torch.zeros(len(methods), rewards.numel(), dtype=_DTYPE, requires_grad=True)  # (M, A)
    # foreach=False: the same Adam update, without the multi-tensor path's overhead on a tiny table.
    optimizer = torch.optim.Adam([logits], lr=lr, foreach=False)
    shuffle = torch.Generator().manual_seed(shuffle_seed)
    regrets: dict[str, list[float]] = {m: [] for m in methods}
    for epoch in range(epochs + 1):
        if epoch > 0:
            for idx in torch.randperm(pairs.arms.numel(), generator=shuffle).split(batch_size):
                batch = pairs.take(idx)
                logprobs = torch.log_softmax(logits, dim=-1)  # (M, A)
                losses = [
                    METHOD_LOSSES[m](logprobs[row], batch, rewards, ref_logprobs, beta)
                    for row, m in enumerate(methods)
                ]
                optimizer.zero_grad(set_to_none=True)
                torch.stack(losses).sum().backward()
                optimizer.step()
        probs = torch.softmax(logits.detach(), dim=-1)  # (M, A)
        for row, method in enumerate(methods):
            regrets[method].append(regret(probs[row], rewards, ref_probs, beta))
    return probs, regrets


def _check_settings(epochs: int, batch_size: int, lr: float, n_pairs: int, beta: float) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"n_pairs must be an integer >= 1, got {n_pairs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def run_copg_bandit(
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 512,
    lr: float = 1e-3,
    n_pairs: int = 10_000,
    beta: float = 0.5,
    out_dir: str | os.PathLike[str] | None = None,
    log_every: int = 0,
    methods: tuple[str, ...] = METHODS,
) -> dict:
    """Run the methods of Figure 1 on one seeded dataset; return the results (schema: `results_schema`).

    `log_every` > 0 prints each method's regret every that many epochs. With `out_dir`, also writes
    out_dir/results.json (atomically) and out_dir/regret.png.
    """
    _check_settings(epochs, batch_size, lr, n_pairs, beta)
    rewards = torch.tensor(REWARDS, dtype=_DTYPE)
    ref_probs = uniform_ref_probs(len(REWARDS))
    data_gen = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.tensor(MU1, dtype=_DTYPE), torch.tensor(MU2, dtype=_DTYPE)
    pairs = sample_pairs(n_pairs, mu1, mu2, rewards, data_gen)
    best = optimal_policy(rewards, ref_probs, beta)
    final_probs, regrets = train_methods(
        methods, pairs, rewards, beta, epochs=epochs, batch_size=batch_size, lr=lr, shuffle_seed=seed + 1
    )
    results_by_method = {}
    for row, method in enumerate(methods):
        curve = regrets[method]
        results_by_method[method] = {
            "final_policy": final_probs[row].tolist(),
            "regret": curve,
            "final_regret": curve[-1],
        }
        if log_every > 0:
            shown = ", ".join(f"{e}: {curve[e]:.4g}" for e in range(0, epochs + 1, log_every))
            print(f"[copg-bandit] {METHOD_LABELS[method]} regret by epoch {{{shown}}}", flush=True)
    results = {
        "seed": seed,
        "settings": _settings_record(epochs, batch_size, lr, n_pairs, beta),
        "optimal_policy": best.tolist(),
        "optimal_value": regularised_value(best, rewards, ref_probs, beta),
        "epochs": list(range(epochs + 1)),
        "methods": results_by_method,
    }
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _settings_record(epochs: int, batch_size: int, lr: float, n_pairs: int, beta: float) -> dict:
    return {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "n_pairs": n_pairs,
        "beta": beta,
        "rewards": list(REWARDS),
        "mu1": list(MU1),
        "mu2": list(MU2),
        "ref_policy": uniform_ref_probs(len(REWARDS)).tolist(),
        "ipo_tau": beta,
        "copg_form": COPG_FORM,
        "optimizer": "Adam(betas=(0.9, 0.999), eps=1e-8)",
        "policy": "tabular softmax, logits initialised at 0 (= pi_ref), float64",
    }


def results_schema() -> dict[str, str]:
    """The keys of results.json, with what each holds (also the contract the tests check)."""
    return {
        "seed": "int: seeds the dataset (and seed + 1 the minibatch order)",
        "settings": "dict: run settings (epochs, lr, batch_size, n_pairs, beta, rewards, mu1, mu2, ...)",
        "optimal_policy": "list[float] (3,): pi* = pi_ref exp(R/beta) / Z*",
        "optimal_value": "float: J(pi*) = beta ln Z*",
        "epochs": "list[int]: 0..epochs, the x-axis of every regret curve",
        "methods": "dict method -> {final_policy: list[float] (3,), regret: list[float] (epochs+1,), "
        "final_regret: float}",
    }


def checkpoint_epochs(epochs: int) -> list[int]:
    """The epochs shown in the table: 0, 1, 5, 10, 25, 50, 100 for 100 epochs, proportionally otherwise."""
    marks = {round(epochs * f) for f in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)}
    marks |= {min(1, epochs)}
    return sorted(marks)


def format_table(results: dict) -> str:
    """Text tables: regret per method at `checkpoint_epochs`, then final policies against pi*."""
    epochs = results["settings"]["epochs"]
    marks = checkpoint_epochs(epochs)
    name_width = max(len(METHOD_LABELS[m]) for m in results["methods"]) + 2
    lines = [f"Regret J(pi*) - J(pi) by epoch (J(pi*) = {results['optimal_value']:.6f})"]
    lines.append("method".ljust(name_width) + "".join(f"{e:>11d}" for e in marks))
    for method, record in results["methods"].items():
        cells = "".join(f"{record['regret'][e]:>11.3e}" for e in marks)
        lines.append(METHOD_LABELS[method].ljust(name_width) + cells)
    lines.append("")
    lines.append("Final policy (arm 1, arm 2, arm 3)")
    lines.append("pi*".ljust(name_width) + "".join(f"{p:>11.4f}" for p in results["optimal_policy"]))
    for method, record in results["methods"].items():
        lines.append(
            METHOD_LABELS[method].ljust(name_width) + "".join(f"{p:>11.4f}" for p in record["final_policy"])
        )
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write out_dir/results.json atomically (tmp file then os.replace) and out_dir/regret.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out / "results.json", results)
    png_path = out / "regret.png"
    plot_regret(results, png_path)
    return json_path, png_path


def plot_regret(results: dict, path: str | os.PathLike[str]) -> None:
    """Figure 1 of the paper: regret vs epoch, one line per method, log-scale y.

    Regrets are floored at 1e-12 for the log axis (float64 regret is exact to ~1e-15).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, record in results["methods"].items():
        ax.plot(results["epochs"], [max(r, 1e-12) for r in record["regret"]], label=METHOD_LABELS[method])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("regret  J(pi*) - J(pi)")
    settings = results["settings"]
    ax.set_title(f"CoPG toy bandit (beta={settings['beta']}, lr={settings['lr']}, seed={results['seed']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp_path = Path(str(path) + ".tmp.png")
    fig.savefig(tmp_path, dpi=120)
    plt.close(fig)
    os.replace(tmp_path, path)


def cli_copg_bandit(epochs: int, seed: int, out: str) -> int:
    """`polyalign repro copg-bandit --epochs N --seed S --out DIR`: run, print the tables, write the files."""
    results = run_copg_bandit(epochs=epochs, seed=seed, out_dir=out)
    print(format_table(results))
    print(f"\nwrote {Path(out) / 'results.json'} and {Path(out) / 'regret.png'}")
    return 0
