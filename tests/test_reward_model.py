"""The shipped sentiment reward model, the RewardModelScorer, and Bradley-Terry reward-model training."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from polyalign.recipes.sentiment_data import build_pairs, load_sentiment, split_sentiment
from polyalign.recipes.sentiment_rm import (
    best_threshold,
    load_base_classifier,
    pairwise_accuracy,
    train_reward_model,
)
from polyalign.rewards import build_reward, score_all
from polyalign.rewards.model import RewardModelScorer, encode_texts, sequence_scores
from tests.conftest import model_atol

ROOT = Path(__file__).resolve().parents[1]
RM_DIR = ROOT / "polyalign" / "assets" / "sentiment_rm"
POSITIVE = "Lily was very happy and smiled at her friend."
NEGATIVE = "Lily was sad and cried because her toy broke."


@pytest.fixture(scope="module")
def scorer() -> RewardModelScorer:
    torch.set_num_threads(1)
    return RewardModelScorer("stories260K-sentiment-rm", batch_size=64)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((RM_DIR / "metrics.json").read_text())


# ---- metric helpers (hand-derived) ------------------------------------------------------------------


def test_pairwise_accuracy_counts_all_pairs_ties_half():
    # pos [3, 1], neg [2, 1]: pairs (3>2) (3>1) (1<2) (1=1 -> 1/2) -> 2.5 / 4
    assert pairwise_accuracy(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0])) == pytest.approx(0.625)


def test_best_threshold_maximises_train_accuracy():
    scores, labels = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1])
    assert best_threshold(scores, labels) == pytest.approx(1.5)
    assert best_threshold(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])) < 1.0  # all positive


# ---- the scorer on the shipped model ----------------------------------------------------------------


def test_scorer_prefers_positive_story_sentence(scorer):
    scores = scorer(["", ""], [POSITIVE, NEGATIVE])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert scores[0] > scores[1] + 1.0, scores
    # as a reward inside the contract, next to a rule
    total, parts = score_all(
        {"rm": scorer}, {"rm": 2.0}, ["Once upon a time,"] * 2, [" " + POSITIVE, " " + NEGATIVE]
    )
    assert torch.allclose(total, 2 * parts["rm"]) and parts["rm"][0] > parts["rm"][1]


def test_scorer_template_controls_scored_text(scorer):
    assert scorer.texts(["Once", "A"], [" upon", " b"]) == ["Once upon", "A b"]
    only = RewardModelScorer("stories260K-sentiment-rm", template="{completion}")
    assert only.texts(["ignored"], [POSITIVE]) == [POSITIVE]
    assert torch.allclose(only(["Anything at all."], [POSITIVE]), scorer([""], [POSITIVE]))
    with pytest.raises(ValueError, match="template must contain"):
        RewardModelScorer("stories260K-sentiment-rm", template="{prompt} {answer}")


def test_batching_and_padding_do_not_change_scores(scorer):
    texts = [POSITIVE, "Tom had fun.", NEGATIVE + " " + NEGATIVE, "Okay."]
    one_by_one = torch.cat([scorer.score_texts([t]) for t in texts])
    atol = model_atol(one_by_one, scorer.model.config)  # batching changes the float32 summation order
    assert torch.allclose(scorer.score_texts(texts), one_by_one, atol=atol)
    # left padding (what a generation engine produces) gives the same scores as right padding
    right = encode_texts(scorer.tokenizer, texts, 512)
    ids, mask = right["input_ids"], right["attention_mask"]
    lengths = mask.sum(-1)
    pad = scorer.model.config.pad_token_id
    left_ids = torch.full_like(ids, pad)
    left_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, ids.shape[1] - n :], left_mask[i, ids.shape[1] - n :] = ids[i, :n], 1
    with torch.inference_mode():
        left = sequence_scores(scorer.model, left_ids, left_mask)
    assert torch.allclose(left, one_by_one, atol=atol)


def test_build_reward_model_spec():
    fn = build_reward("model:stories260K-sentiment-rm", batch_size=8)
    assert isinstance(fn, RewardModelScorer) and fn.batch_size == 8
    out = fn(["", ""], [POSITIVE, NEGATIVE])
    assert out[0] > out[1]


def test_model_card_accuracy_is_reproduced_on_held_out_split(scorer, metrics):
    settings = metrics["settings"]
    test = split_sentiment(load_sentiment(), seed=settings["seed"])["test"]
    scores = scorer.score_texts([s.text for s in test])
    labels = torch.tensor([s.label for s in test])
    accuracy = pairwise_accuracy(scores[labels == 1], scores[labels == 0])
    assert accuracy == pytest.approx(metrics["test"]["pairwise_accuracy"], abs=0.01)
    assert accuracy > 0.7
    card = (RM_DIR / "README.md").read_text()
    assert f"{metrics['test']['pairwise_accuracy']:.4f}" in card
    assert "CC BY 4.0" in card and "MIT" in card


def test_shipped_settings_match_reproduce_script(metrics):
    script = (ROOT / "scripts" / "train_sentiment_rm.sh").read_text()
    settings = metrics["settings"]
    flags = dict(re.findall(r"--([a-z-]+) (\S+)", script))
    assert flags["out"] == "polyalign/assets/sentiment_rm" and flags["base"] == settings["base"]
    for key in ("epochs", "lr", "batch_size", "seed", "weight_decay", "max_length"):
        assert float(flags[key.replace("_", "-")]) == float(settings[key]), key
    assert settings["max_steps"] is None


# ---- training ---------------------------------------------------------------------------------------


def test_base_classifier_keeps_body_and_seeds_fresh_head():
    from transformers import AutoModelForCausalLM

    model_a, tokenizer = load_base_classifier("stories260K", seed=0)
    model_b, _ = load_base_classifier("stories260K", seed=1)
    base = AutoModelForCausalLM.from_pretrained(ROOT / "polyalign" / "assets" / "stories260K")
    assert torch.equal(model_a.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert not torch.equal(model_a.score.weight, model_b.score.weight)
    assert torch.equal(model_a.score.weight, load_base_classifier("stories260K", seed=0)[0].score.weight)
    assert model_a.config.pad_token_id == tokenizer.pad_token_id == 0


def test_train_steps_lower_bradley_terry_loss_on_fixed_pairs():
    from polyalign.losses import bradley_terry_loss
    from polyalign.recipes.sentiment_rm import _train_step

    torch.set_num_threads(1)
    model, tokenizer = load_base_classifier("stories260K", seed=0)
    pairs = build_pairs(split_sentiment(load_sentiment())["train"], seed=0)[:8]

    def loss_now() -> float:
        enc = encode_texts(tokenizer, [c for c, _ in pairs] + [r for _, r in pairs], 128)
        with torch.no_grad():
            scores = sequence_scores(model, enc["input_ids"], enc["attention_mask"])
        return bradley_terry_loss(scores[:8], scores[8:])[0].item()

    before = loss_now()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        _train_step(model, tokenizer, optimizer, pairs, max_length=128)
    assert before == pytest.approx(math.log(2), abs=0.05) and loss_now() < before - 0.2


@pytest.mark.slow
def test_tiny_training_run_lowers_loss_and_saves_loadable_model(tmp_path):
    torch.set_num_threads(1)
    metrics = train_reward_model(out_dir=tmp_path, max_steps=16, batch_size=16, lr=3e-3, log_every=8)
    losses = metrics["loss_curve"]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # fresh head: scores near 0
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05, losses
    assert metrics["train"]["pairwise_accuracy"] > 0.6
    saved = RewardModelScorer(str(tmp_path))
    assert "--max-steps 16" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "model.safetensors").is_file()
    probe = metrics["story_probes"][0]
    assert saved([""], [probe["positive"]]).item() == pytest.approx(probe["positive_score"], abs=1e-4)
