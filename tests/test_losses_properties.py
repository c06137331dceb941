"""Properties and reference equivalences of polyalign.losses (STYLE B.7 layers 2-4; SPEC 4.3 and 7).

The policy in these tests is a tiny "per-token logits" model: one learnable logit table (T, V) shared by
all sequences, so log pi(y) = sum_t log softmax(theta_t)[y_t]. Gradients are compared with autograd.
"""

import itertools

import pytest
import torch

from polyalign.losses import (
    copg_group_loss,
    copg_loss,
    gae_advantages,
    ipo_loss,
    kl_shaped_rewards,
    masked_sum,
    ppo_clip_loss,
    reinforce_loss,
    rloo_advantages,
)


@pytest.fixture(autouse=True)
def _float64():
    """Gradients are compared in float64 so tolerances can be tight; the default dtype is restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def allclose(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=tol, rtol=1e-7)


class TokenPolicy:
    """Learnable logits (T, V); samples right-padded sequences; gives per-token log-probs (B, T)."""

    def __init__(self, seed: int, length: int = 5, vocab: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.theta = (torch.randn(length, vocab, generator=g) * 0.5).requires_grad_(True)
        self.ref = torch.randn(length, vocab, generator=g) * 0.5
        self.generator = g

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.theta.detach(), dim=-1)  # (T, V)
        tokens = torch.stack(
            [torch.multinomial(p, batch, replacement=True, generator=self.generator) for p in probs], 1
        )
        lengths = torch.randint(1, probs.shape[0] + 1, (batch,), generator=self.generator)
        mask = (torch.arange(probs.shape[0])[None, :] < lengths[:, None]).long()  # (B, T)
        return tokens, mask

    def logprobs(self, tokens: torch.Tensor, ref: bool = False) -> torch.Tensor:
        table = torch.log_softmax(self.ref if ref else self.theta, dim=-1)  # (T, V)
        return table.gather(1, tokens.T).T  # (B, T)

    def grad(self, loss: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, self.theta, retain_graph=True)
        return g


# ---------- RLOO ----------


def test_rloo_loop_vs_vectorised_and_identities():
    g = torch.Generator().manual_seed(0)
    for group in (2, 3, 5):
        rewards = torch.randn(6, group, generator=g)
        adv = rloo_advantages(rewards)
        naive = [
            [r[i] - sum(r[j] for j in range(group) if j != i) / (group - 1) for i in range(group)]
            for r in rewards.tolist()
        ]
        assert allclose(adv, torch.tensor(naive))
        assert allclose(adv.sum(dim=1), torch.zeros(6))
        assert allclose(adv, group / (group - 1) * (rewards - rewards.mean(dim=1, keepdim=True)))


# ---------- GAE ----------


def naive_gae(
    rewards: list[float], values: list[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Textbook GAE over one unpadded sequence; the state after the last token is terminal (V = 0)."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_loop_with_right_padding(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 1, 4, 6, 2]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        assert allclose(adv[b, :n], torch.tensor(ref_adv)) and allclose(ret[b, :n], torch.tensor(ref_ret))
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    if gamma == lam == 1.0:  # returns = reward-to-go
        to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
        assert allclose(ret, to_go)


# ---------- REINFORCE / PPO equivalences ----------


def test_reinforce_ratio_one_clip_equals_no_clip_and_paper_gradient():
    policy = TokenPolicy(seed=2)
    tokens, mask = policy.sample(8)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(3))
    for aggregate in ("sum", "token_mean"):
        logp = policy.logprobs(tokens)
        old = logp.detach()
        clipped, stats = reinforce_loss(logp, adv, mask, aggregate, old_logprobs=old, clip_eps=0.2)
        ratio_only, _ = reinforce_loss(logp, adv, mask, aggregate, old_logprobs=old)
        paper, _ = reinforce_loss(logp, adv, mask, aggregate)
        assert allclose(clipped, ratio_only) and allclose(clipped, -adv.mean())  # rho = 1: value -mean A
        assert allclose(stats["clip_frac"], torch.tensor(0.0)) and allclose(
            stats["ratio_mean"], torch.tensor(1.0)
        )
        grad_paper = policy.grad(paper)
        assert allclose(policy.grad(clipped), grad_paper) and allclose(policy.grad(ratio_only), grad_paper)
        assert grad_paper.abs().sum() > 0


def test_ppo_ratio_one_equals_vanilla_token_level_pg():
    """With old = new, grad PPO = grad of -aggregate(A_t * logp_t) (vanilla PG); with A (B,) broadcast and
    aggregate "sum"/"token_mean" it is also the gradient of reinforce_loss with the same aggregate."""
    policy = TokenPolicy(seed=4)
    tokens, mask = policy.sample(6)
    g = torch.Generator().manual_seed(5)
    token_adv, seq_adv = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    for aggregate in ("sum", "token_mean", "batch_token_mean"):
        logp = policy.logprobs(tokens)
        ppo, stats = ppo_clip_loss(logp, logp.detach(), token_adv, mask, clip_eps=0.2, aggregate=aggregate)
        per_token = -(token_adv * logp) * mask
        if aggregate == "sum":
            vanilla = per_token.sum(1).mean()
        elif aggregate == "token_mean":
            vanilla = (per_token.sum(1) / mask.sum(1)).mean()
        else:
            vanilla = per_token.sum() / mask.sum()
        assert allclose(policy.grad(ppo), policy.grad(vanilla)) and allclose(
            stats["clip_frac"], torch.tensor(0.0)
        )
    for aggregate in ("sum", "token_mean"):
        logp = policy.logprobs(tokens)
        ppo, _ = ppo_clip_loss(logp, logp.detach(), seq_adv, mask, aggregate=aggregate)
        assert allclose(policy.grad(ppo), policy.grad(reinforce_loss(logp, seq_adv, mask, aggregate)[0]))


def test_ppo_clipping_zeroes_gradient_outside_trust_region():
    """A > 0 and rho > 1 + eps: the clipped branch is active, the token contributes no gradient."""
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]])  # rho = (e^0.5, 1)
    loss, stats = ppo_clip_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 1]]), clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and allclose(stats["clip_frac"], torch.tensor(0.5))


def test_reinforce_microbatches_equal_full_batch():
    """Grad accumulation: mean of 4 micro-batch losses of 2 == full batch of 8 (loss is a mean over B)."""
    policy = TokenPolicy(seed=6)
    tokens, mask = policy.sample(8)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(7))
    full = policy.grad(reinforce_loss(policy.logprobs(tokens), adv, mask)[0])
    parts = sum(
        policy.grad(reinforce_loss(policy.logprobs(tokens[i : i + 2]), adv[i : i + 2], mask[i : i + 2])[0])
        for i in range(0, 8, 2)
    )
    assert allclose(full, parts / 4)


# ---------- CoPG ----------


def _pairs(policy: TokenPolicy, prompts: int, group: int = 2):
    tokens, mask = policy.sample(prompts * group)
    scores = torch.randn(prompts * group, generator=policy.generator)
    return tokens, mask, scores


def test_copg_squared_and_surrogate_have_identical_gradients():
    policy = TokenPolicy(seed=8)
    tokens, mask, scores = _pairs(policy, prompts=5)
    grads = []
    for form in ("squared", "surrogate"):
        seq = masked_sum(policy.logprobs(tokens), mask, dim=-1)
        ref = masked_sum(policy.logprobs(tokens, ref=True), mask, dim=-1)
        loss, _ = copg_loss(
            seq[0::2], seq[1::2], ref[0::2], ref[1::2], scores[0::2], scores[1::2], beta=0.3, form=form
        )
        grads.append(policy.grad(loss))
    assert allclose(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_copg_objective_identity_on_random_pairs():
    """beta * l_CoPG = DR^2/2 - (DR - beta Da)^2/2, per pair, so loss_squared = DR^2/(2 beta) - l_CoPG."""
    g = torch.Generator().manual_seed(9)
    lp, lpp, ref, refp, r, rp = (torch.randn(1, generator=g) for _ in range(6))
    beta = 0.25
    loss, stats = copg_loss(lp, lpp, ref, refp, r, rp, beta=beta)
    dr, da = r - rp, (lp - ref) - (lpp - refp)
    assert allclose(beta * stats["copg_objective"], (dr**2 / 2 - (dr - beta * da) ** 2 / 2).squeeze())
    assert allclose(loss, (dr**2 / (2 * beta)).squeeze() - stats["copg_objective"])


def test_copg_property2_equals_rloo_k2_with_kl_shaped_rewards():
    """SPEC 4.3 Property 2: grad CoPG (mean over pairs) = 2 x grad reinforce_loss(RLOO, k=2, mean over
    2P sequences) when the RLOO rewards are KL-shaped with the same beta (k1, sequence sum)."""
    policy, beta = TokenPolicy(seed=10), 0.2
    tokens, mask, scores = _pairs(policy, prompts=6)
    logp, ref_logp = policy.logprobs(tokens), policy.logprobs(tokens, ref=True)
    seq, ref = masked_sum(logp, mask, dim=-1), masked_sum(ref_logp, mask, dim=-1)
    copg, _ = copg_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], scores[0::2], scores[1::2], beta=beta)
    shaped = kl_shaped_rewards(scores, logp, ref_logp, mask, beta=beta)
    advantages = rloo_advantages(shaped.view(6, 2)).reshape(-1)
    rloo, _ = reinforce_loss(policy.logprobs(tokens), advantages, mask)
    grad_copg, grad_rloo = policy.grad(copg), policy.grad(rloo)
    assert allclose(grad_copg, 2 * grad_rloo) and grad_rloo.abs().sum() > 0
    # raw scores in the baseline (no KL shaping) break the equality
    raw = reinforce_loss(policy.logprobs(tokens), rloo_advantages(scores.view(6, 2)).reshape(-1), mask)[0]
    assert not allclose(grad_copg, 2 * policy.grad(raw), tol=1e-6)


def test_copg_property3_equals_ipo_gradient_for_binary_rewards():
    """SPEC 4.3 Property 3: R(y) = +1/4, R(y') = -1/4 -> grad CoPG loss = (1/(2 beta)) grad (1/2 - beta h)^2
    = (beta/2) grad ipo_loss, since (1/2 - beta h)^2 = beta^2 (h - 1/(2 beta))^2; i.e. grad IPO = -2 beta grad l."""
    policy, beta = TokenPolicy(seed=11), 0.4
    tokens, mask, _ = _pairs(policy, prompts=5)

    def seq_logps():
        return masked_sum(policy.logprobs(tokens), mask, dim=-1), masked_sum(
            policy.logprobs(tokens, ref=True), mask, -1
        )

    seq, ref = seq_logps()
    quarter = torch.full((5,), 0.25)
    copg, _ = copg_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], quarter, -quarter, beta=beta)
    grad_copg = policy.grad(copg)
    seq, ref = seq_logps()
    ipo, _ = ipo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=beta)
    assert allclose(grad_copg, beta / 2 * policy.grad(ipo))
    seq, ref = seq_logps()
    h = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    copg_form_ipo = ((0.5 - beta * h) ** 2).mean()
    assert allclose(grad_copg, policy.grad(copg_form_ipo) / (2 * beta))


def test_copg_group_g2_equals_pair_loss():
    policy, beta = TokenPolicy(seed=12), 0.15
    tokens, mask, scores = _pairs(policy, prompts=4)
    seq, ref = (
        masked_sum(policy.logprobs(tokens), mask, -1),
        masked_sum(policy.logprobs(tokens, ref=True), mask, -1),
    )
    pair, pair_stats = copg_loss(
        seq[0::2], seq[1::2], ref[0::2], ref[1::2], scores[0::2], scores[1::2], beta=beta
    )
    grad_pair = policy.grad(pair)
    seq = masked_sum(policy.logprobs(tokens), mask, -1)
    group, group_stats = copg_group_loss(seq.view(4, 2), ref.view(4, 2), scores.view(4, 2), beta=beta)
    assert allclose(group, pair) and allclose(policy.grad(group), grad_pair)
    assert allclose(group_stats["copg_objective"], pair_stats["copg_objective"])


def test_copg_group_loop_over_pairs_vs_vectorised_and_rloo_gradient():
    """G=4: loss = mean_p 1/(G-1) sum_{i>j} copg_loss(y_i, y_j); gradient = G x RLOO(KL-shaped) gradient."""
    policy, beta, prompts, group = TokenPolicy(seed=13), 0.3, 3, 4
    tokens, mask, scores = _pairs(policy, prompts, group)
    logp, ref_logp = policy.logprobs(tokens), policy.logprobs(tokens, ref=True)
    seq, ref = (
        masked_sum(logp, mask, -1).view(prompts, group),
        masked_sum(ref_logp, mask, -1).view(prompts, group),
    )
    r = scores.view(prompts, group)
    vec, vec_stats = copg_group_loss(seq, ref, r, beta=beta)
    loop, objective = 0.0, 0.0
    for p in range(prompts):
        for i, j in itertools.combinations(range(group), 2):
            loss, stats = copg_loss(
                seq[p, i : i + 1],
                seq[p, j : j + 1],
                ref[p, i : i + 1],
                ref[p, j : j + 1],
                r[p, i : i + 1],
                r[p, j : j + 1],
                beta=beta,
            )
            loop, objective = loop + loss, objective + stats["copg_objective"]
    loop, objective = loop / (prompts * (group - 1)), objective / (prompts * (group - 1))
    assert allclose(vec, loop) and allclose(vec_stats["copg_objective"], objective)
    grad_vec = policy.grad(vec)
    assert allclose(grad_vec, policy.grad(loop))
    shaped = kl_shaped_rewards(scores, logp, ref_logp, mask, beta=beta)
    rloo, _ = reinforce_loss(
        policy.logprobs(tokens), rloo_advantages(shaped.view(prompts, group)).reshape(-1), mask
    )
    assert allclose(grad_vec, group * policy.grad(rloo))
    surrogate, _ = copg_group_loss(
        masked_sum(policy.logprobs(tokens), mask, -1).view(prompts, group), ref, r, beta, "surrogate"
    )
    assert allclose(policy.grad(surrogate), grad_vec)
    with pytest.raises(ValueError, match="G >= 2"):
        copg_group_loss(seq[:, :1], ref[:, :1], r[:, :1], beta=beta)
