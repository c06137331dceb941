"""Tests for the CoPG toy-bandit reproduction (SPEC 4.4, Figure 1 of arXiv:2406.19185).

One run with the paper's exact settings (100 epochs, lr 1e-3, batch 512, 10^4 pairs) is shared by several
tests; a reduced setting (larger lr, fewer pairs) checks convergence in a fraction of a second.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from polyalign.recipes import copg_bandit as cb

BETA = 0.5
REWARDS = torch.tensor(cb.REWARDS, dtype=torch.float64)
REF = cb.uniform_ref_probs(3)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("copg_bandit")
    return cb.run_copg_bandit(epochs=100, seed=0, out_dir=out), out


@pytest.fixture(scope="module")
def fast_run() -> dict:
    """Reduced setting: 2000 pairs, batch 256, lr 3e-2, 30 epochs (~240 Adam steps per method)."""
    return cb.run_copg_bandit(epochs=30, seed=3, batch_size=256, lr=3e-2, n_pairs=2000)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def test_optimal_policy_closed_form_and_value() -> None:
    """pi* = softmax(R/beta) for a uniform pi_ref, logits (5, 4, 2); J(pi*) = beta ln mean(exp(R/beta))."""
    best = cb.optimal_policy(REWARDS, REF, BETA)
    expected = torch.exp(torch.tensor([5.0, 4.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(best, expected / expected.sum())
    z_star = float(torch.exp(REWARDS / BETA).mean())
    assert cb.regularised_value(best, REWARDS, REF, BETA) == pytest.approx(BETA * math.log(z_star), rel=1e-12)
    assert cb.regret(best, REWARDS, REF, BETA) == pytest.approx(0.0, abs=1e-12)


def test_optimal_policy_maximises_value_under_random_perturbations() -> None:
    gen = torch.Generator().manual_seed(0)
    best = cb.optimal_policy(REWARDS, REF, BETA)
    best_value = cb.regularised_value(best, REWARDS, REF, BETA)
    for scale in (1e-3, 1e-1, 2.0):
        noise = scale * torch.randn(200, 3, generator=gen, dtype=torch.float64)
        for perturbed in torch.softmax(best.log() + noise, dim=-1):
            gap = best_value - cb.regularised_value(perturbed, REWARDS, REF, BETA)
            assert gap > 0.0
            # J(pi*) - J(pi) = beta KL(pi || pi*): the regret identity.
            assert gap == pytest.approx(BETA * _kl(perturbed, best), rel=1e-6, abs=1e-12)


def test_regret_of_uniform_policy_matches_hand_value() -> None:
    """At pi = pi_ref the KL term vanishes: regret = beta ln Z* - mean(R) = 0.5 ln((e^5+e^4+e^2)/3) - 11/6."""
    z_star = (math.exp(5) + math.exp(4) + math.exp(2)) / 3
    assert cb.regret(REF, REWARDS, REF, BETA) == pytest.approx(0.5 * math.log(z_star) - 5.5 / 3, rel=1e-12)


def test_sample_pairs_frequencies_preferences_and_seed() -> None:
    mu1, mu2 = torch.tensor(cb.MU1, dtype=torch.float64), torch.tensor(cb.MU2, dtype=torch.float64)
    pairs = cb.sample_pairs(200_000, mu1, mu2, REWARDS, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        torch.bincount(pairs.arms, minlength=3).double() / 200_000, mu1, atol=5e-3, rtol=0
    )
    torch.testing.assert_close(
        torch.bincount(pairs.arms_prime, minlength=3).double() / 200_000, mu2, atol=5e-3, rtol=0
    )
    # Bradley-Terry: for (y, y') = (arm 0, arm 2), y wins with probability sigmoid(2.5 - 1) = 0.8176.
    sel = (pairs.arms == 0) & (pairs.arms_prime == 2)
    win_rate = float((pairs.chosen[sel] == 0).double().mean())
    assert win_rate == pytest.approx(1 / (1 + math.exp(-1.5)), abs=0.02)
    assert torch.equal(
        torch.sort(torch.stack([pairs.chosen, pairs.rejected]), dim=0).values,
        torch.sort(torch.stack([pairs.arms, pairs.arms_prime]), dim=0).values,
    )
    again = cb.sample_pairs(200_000, mu1, mu2, REWARDS, torch.Generator().manual_seed(1))
    assert torch.equal(again.chosen, pairs.chosen) and torch.equal(again.arms, pairs.arms)


@pytest.mark.parametrize("method", ["pg", "pg_value"])
def test_pg_gradients_are_eq_24(method: str) -> None:
    """For a softmax policy grad_theta ln pi(y) = e_y - pi, so minus the gradient of the method's loss must be
    mean over pairs of (R_beta(y) - b)(e_y - pi) + (R_beta(y') - b)(e_y' - pi), with b = 0 for "pg" and
    b = sum_y pi(y) R(y) (exact, unregularised) for "pg_value"."""
    logits = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    arms, arms_prime = torch.tensor([0, 2, 1, 2]), torch.tensor([2, 2, 0, 1])
    batch = cb.BanditPairs(arms, arms_prime, arms, arms_prime)
    loss = cb.METHOD_LOSSES[method](torch.log_softmax(logits, dim=-1), batch, REWARDS, REF.log(), BETA)
    (grad,) = torch.autograd.grad(loss, logits)
    probs = torch.softmax(logits.detach(), dim=-1)
    baseline = float((probs * REWARDS).sum()) if method == "pg_value" else 0.0
    reg_reward = REWARDS - BETA * (probs.log() - REF.log())  # R_beta per arm
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for y, yp in zip(arms.tolist(), arms_prime.tolist()):
        expected += (reg_reward[y] - baseline) * (eye[y] - probs) + (reg_reward[yp] - baseline) * (
            eye[yp] - probs
        )
    torch.testing.assert_close(grad, -expected / len(arms))


def test_only_copg_is_stationary_at_pi_star_on_the_dataset() -> None:
    """Theorem 1 on the empirical data: every CoPG pair residual vanishes at pi*, so its gradient is 0 there;
    IPO and both PG variants are pushed away from pi* (their biases)."""
    mu1, mu2 = torch.tensor(cb.MU1, dtype=torch.float64), torch.tensor(cb.MU2, dtype=torch.float64)
    pairs = cb.sample_pairs(10_000, mu1, mu2, REWARDS, torch.Generator().manual_seed(0))
    best_logits = cb.optimal_policy(REWARDS, REF, BETA).log()
    for method, loss_fn in cb.METHOD_LOSSES.items():
        logits = best_logits.clone().requires_grad_(True)
        loss = loss_fn(torch.log_softmax(logits, dim=-1), pairs, REWARDS, REF.log(), BETA)
        (grad,) = torch.autograd.grad(loss, logits)
        if method == "copg":
            assert grad.abs().max() < 1e-10
        else:
            assert grad.abs().max() > 1e-2, method


def test_fast_setting_copg_converges_to_pi_star_others_biased(fast_run: dict) -> None:
    methods = fast_run["methods"]
    copg = methods["copg"]
    assert copg["final_regret"] < 1e-8
    torch.testing.assert_close(
        torch.tensor(copg["final_policy"]), torch.tensor(fast_run["optimal_policy"]), atol=1e-4, rtol=0
    )
    for other in ("ipo", "pg", "pg_value"):
        assert methods[other]["final_regret"] > 100 * max(copg["final_regret"], 1e-9), other
    assert methods["ipo"]["final_regret"] > 0.1  # expected-preference optimum, ~0.15
    assert methods["pg_value"]["final_regret"] > 1e-3
    assert methods["pg"]["final_regret"] > methods["pg"]["regret"][0] + 0.2  # drifts towards arm 3


def test_paper_settings_reproduce_figure_1_trends(paper_run: tuple[dict, object]) -> None:
    results, _ = paper_run
    methods = results["methods"]
    curves = {m: torch.tensor(r["regret"], dtype=torch.float64) for m, r in methods.items()}
    assert all(len(c) == 101 for c in curves.values())
    assert len({float(c[0]) for c in curves.values()}) == 1  # all start at pi_ref
    # CoPG's regret falls every epoch. PG without baseline rises through the first half, then plateaus at its
    # biased fixed point (regret ~0.64, where pi(arm 3) ~0.56) with minibatch jitter.
    assert bool((curves["copg"][1:] < curves["copg"][:-1]).all())
    assert bool((curves["pg"][1:51] > curves["pg"][:50]).all())
    assert float(curves["pg"][-1]) > float(curves["pg"][0]) + 0.3
    # After 100 epochs: CoPG lowest, then PG(value), IPO, PG(b=0); IPO has plateaued at its biased solution.
    finals = {m: r["final_regret"] for m, r in methods.items()}
    assert finals["copg"] < finals["pg_value"] < finals["ipo"] < finals["pg"]
    assert abs(float(curves["ipo"][-1] - curves["ipo"][-26])) < 5e-3 and finals["ipo"] > 0.1


def test_results_json_and_png_written_with_schema(paper_run: tuple[dict, object]) -> None:
    results, out = paper_run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == set(cb.results_schema())
    assert saved["seed"] == 0 and saved["settings"]["epochs"] == 100 and saved["settings"]["lr"] == 1e-3
    assert saved["settings"]["ipo_tau"] == saved["settings"]["beta"] == 0.5
    assert saved["epochs"] == list(range(101))
    assert set(saved["methods"]) == set(cb.METHODS)
    for record in saved["methods"].values():
        assert set(record) == {"final_policy", "regret", "final_regret"}
        assert len(record["regret"]) == 101 and record["final_regret"] == record["regret"][-1]
        assert sum(record["final_policy"]) == pytest.approx(1.0)
    assert saved["optimal_policy"] == pytest.approx(cb.optimal_policy(REWARDS, REF, BETA).tolist())
    assert saved == json.loads(json.dumps(results))
    png = (out / "regret.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(out.glob("*.tmp*"))


def test_table_and_cli(tmp_path, capsys) -> None:
    assert cb.checkpoint_epochs(100) == [0, 1, 5, 10, 25, 50, 100]
    assert cb.checkpoint_epochs(3) == [0, 1, 2, 3]
    assert cb.cli_copg_bandit(epochs=2, seed=5, out=str(tmp_path / "run")) == 0
    printed = capsys.readouterr().out
    for label in ("CoPG", "IPO", "PG (b=0)", "PG (value baseline)", "pi*", "Regret"):
        assert label in printed
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["seed"] == 5 and len(saved["methods"]["copg"]["regret"]) == 3
    assert (tmp_path / "run" / "regret.png").exists()


def test_same_seed_same_results_and_methods_independent() -> None:
    """Reproducible per seed; training methods together equals training each alone (Adam is elementwise)."""
    kwargs = dict(epochs=3, seed=7, batch_size=128, n_pairs=500, lr=1e-2)
    both = cb.run_copg_bandit(**kwargs)
    assert both == cb.run_copg_bandit(**kwargs)
    alone = cb.run_copg_bandit(**kwargs, methods=("ipo",))
    assert alone["methods"]["ipo"]["regret"] == pytest.approx(both["methods"]["ipo"]["regret"], rel=1e-12)
    assert cb.run_copg_bandit(**{**kwargs, "seed": 8})["methods"]["copg"] != both["methods"]["copg"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_pairs": 0}, "n_pairs"),
        ({"lr": 0.0}, "lr"),
        ({"beta": float("nan")}, "beta"),
        ({"methods": ("copg", "dpo")}, "methods"),
        ({"methods": ()}, "methods"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cb.run_copg_bandit(**{"epochs": 1, "n_pairs": 10, **kwargs})
