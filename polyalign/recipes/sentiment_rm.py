"""Bradley-Terry reward-model training on the shipped sentiment sentences.

A sequence classifier (num_labels=1) is initialised from a causal LM checkpoint (the transformer body is
loaded, the one-output `score` head is freshly initialised), then trained so that a positive sentence
scores higher than a negative one: loss = -log sigmoid(s_chosen - s_rejected) (`bradley_terry_loss`).
Pairs are re-drawn every epoch (random positive x negative pairing, seeded). Evaluation on the held-out
splits reports
- pairwise accuracy: the fraction of ALL (positive, negative) pairs of the split where the positive
  scores higher (ties count 1/2; this is the ROC AUC of the score, free of pairing noise);
- pointwise accuracy: label = [score > threshold], threshold chosen to maximise train accuracy.

Reproduce the shipped `stories260K-sentiment-rm` (about a minute on one CPU thread):

    bash scripts/train_sentiment_rm.sh
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from polyalign.losses import bradley_terry_loss
from polyalign.models import load_base_classifier
from polyalign.recipes.sentiment_data import LabelledSentence, build_pairs, load_sentiment, split_sentiment
from polyalign.rewards.model import encode_texts, score_texts, sequence_scores

# Story-style sentences to check that the RM transfers from review text to TinyStories text. They are
# reported in the metrics and model card only; they are never used for training or model selection.
STORY_PROBES = (
    ("Lily was very happy and smiled at her friend.", "Lily was sad and cried because her toy broke."),
    ("Tom loved the big red ball. He had so much fun!", "Tom hated the big red ball. It was boring."),
    ("The sun was warm and the birds sang a happy song.", "The dark room was scary and Ben was afraid."),
    ("Mom gave Sue a hug and said she was a good girl.", "Mom was angry and yelled at Sue for the mess."),
    ("They played together all day and had a wonderful time.", "They fought all day and everyone was upset."),
)


def pairwise_accuracy(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Fraction of (positive, negative) pairs with positive > negative; ties count 1/2."""
    diff = positive_scores[:, None] - negative_scores[None, :]  # (Npos, Nneg)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Threshold t maximising accuracy of [score > t] == label (midpoint between neighbouring scores)."""
    order = scores.argsort()
    s, y = scores[order], labels[order].float()
    # Cutting after position i (0 = before all): predicted negative = s[:i], positive = s[i:].
    correct = torch.cat([torch.zeros(1), (1 - y).cumsum(0)]) + torch.cat(
        [y.flip(0).cumsum(0).flip(0), torch.zeros(1)]
    )
    i = int(correct.argmax())
    if i == 0:
        return s[0].item() - 1.0
    if i == len(s):
        return s[-1].item() + 1.0
    return ((s[i - 1] + s[i]) / 2).item()


def evaluate(
    model: Any, tokenizer: Any, split: list[LabelledSentence], threshold: float, max_length: int
) -> dict:
    """Pairwise and pointwise accuracy of the model on one split."""
    scores = score_texts(model, tokenizer, [s.text for s in split], batch_size=128, max_length=max_length)
    labels = torch.tensor([s.label for s in split])
    return {
        "pairwise_accuracy": pairwise_accuracy(scores[labels == 1], scores[labels == 0]),
        "pointwise_accuracy": ((scores > threshold).long() == labels).float().mean().item(),
        "n": len(split),
    }


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_reward_model(
    base: str = "stories260K",
    out_dir: str | Path | None = None,
    epochs: int = 6,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.01,
    max_length: int = 128,
    max_steps: int | None = None,
    log_every: int = 25,
) -> dict:
    """Train a Bradley-Terry sentiment reward model; save it to `out_dir` when given; return metrics.

    max_steps caps the number of optimizer steps (for quick tests); None trains all `epochs`.
    Returned metrics: train/val/test accuracies, threshold, loss curve, story-probe scores, settings.
    """
    settings = dict(base=base, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    settings.update(weight_decay=weight_decay, max_length=max_length, max_steps=max_steps)
    random.seed(seed)
    torch.manual_seed(seed)
    model, tokenizer = load_base_classifier(base, seed)
    splits = split_sentiment(load_sentiment(), seed=seed)
    batches = _pair_batches(splits["train"], epochs, batch_size, seed, max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    print(f"training a {base} reward model: {len(batches)} steps of {batch_size} pairs")
    losses, start = [], time.time()
    model.train()
    for step, (epoch, pairs) in enumerate(batches, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step - 1, len(batches), warmup=max(1, len(batches) // 20))
        loss, stats = _train_step(model, tokenizer, optimizer, pairs, max_length)
        losses.append(loss)
        if step % log_every == 0 or step == len(batches):
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            progress = f"epoch {epoch} step {step}/{len(batches)}"
            print(f"{progress} loss {recent:.4f} acc {stats['accuracy']:.2f} ({time.time() - start:.0f}s)")
    model.eval()
    metrics = _final_metrics(model, tokenizer, splits, max_length)
    metrics.update(
        loss_curve=losses, steps=len(batches), seconds=round(time.time() - start, 1), settings=settings
    )
    print(
        f"held-out test: pairwise {metrics['test']['pairwise_accuracy']:.4f}, "
        f"pointwise {metrics['test']['pointwise_accuracy']:.4f}"
    )
    if out_dir is not None:
        save_reward_model(model, tokenizer, metrics, Path(out_dir))
    return metrics


def _pair_batches(
    train: list[LabelledSentence], epochs: int, batch_size: int, seed: int, max_steps: int | None
) -> list[tuple[int, list[tuple[str, str]]]]:
    """(epoch, pairs) for every optimizer step; pairs are re-drawn each epoch; capped at max_steps."""
    batches = []
    for epoch in range(epochs):
        pairs = build_pairs(train, seed=seed * 1000 + epoch)
        batches += [(epoch, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    return batches[:max_steps] if max_steps is not None else batches


def _train_step(model: Any, tokenizer: Any, optimizer: Any, pairs: list[tuple[str, str]], max_length: int):
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    enc = encode_texts(tokenizer, chosen + rejected, max_length)
    scores = sequence_scores(model, enc["input_ids"], enc["attention_mask"])  # (2B,)
    loss, stats = bradley_terry_loss(scores[: len(pairs)], scores[len(pairs) :])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item(), {k: v.item() for k, v in stats.items()}


def _final_metrics(model: Any, tokenizer: Any, splits: dict, max_length: int) -> dict:
    train = splits["train"]
    train_scores = score_texts(
        model, tokenizer, [s.text for s in train], batch_size=128, max_length=max_length
    )
    threshold = best_threshold(train_scores, torch.tensor([s.label for s in train]))
    metrics: dict[str, Any] = {"threshold": threshold}
    for name in ("train", "val", "test"):
        metrics[name] = evaluate(model, tokenizer, splits[name], threshold, max_length)
    texts = [t for pair in STORY_PROBES for t in pair]
    probe = score_texts(model, tokenizer, texts, max_length=max_length).tolist()
    metrics["story_probes"] = [
        {"positive": p, "negative": n, "positive_score": probe[2 * i], "negative_score": probe[2 * i + 1]}
        for i, (p, n) in enumerate(STORY_PROBES)
    ]
    return metrics


def reproduce_command(settings: dict, out_dir: str | Path) -> str:
    """The exact command line that retrains a model with these settings."""
    cmd = (
        f"python -m polyalign.recipes.sentiment_rm --base {settings['base']} --out {out_dir} "
        f"--epochs {settings['epochs']} --lr {settings['lr']} --batch-size {settings['batch_size']} "
        f"--seed {settings['seed']} --weight-decay {settings['weight_decay']} "
        f"--max-length {settings['max_length']}"
    )
    return cmd + (f" --max-steps {settings['max_steps']}" if settings.get("max_steps") else "")


def save_reward_model(model: Any, tokenizer: Any, metrics: dict, out_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer files + metrics.json + README.md model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out_dir / "README.md").write_text(model_card(metrics, out_dir))
    print(f"saved reward model to {out_dir}")


def _card_tables(metrics: dict) -> tuple[str, str]:
    """The model card's table rows: accuracy per split, and the story probes' scores."""
    rows = "\n".join(
        f"| {name} | {metrics[name]['n']} | {metrics[name]['pairwise_accuracy']:.4f} "
        f"| {metrics[name]['pointwise_accuracy']:.4f} |"
        for name in ("train", "val", "test")
    )
    probes = "\n".join(
        f"| {p['positive']} | {p['positive_score']:+.3f} | {p['negative']} | {p['negative_score']:+.3f} |"
        for p in metrics["story_probes"]
    )
    return rows, probes


def model_card(metrics: dict, out_dir: Path) -> str:
    """README.md for a trained sentiment reward model."""
    cfg, (rows, probes) = metrics["settings"], _card_tables(metrics)
    return f"""# stories260K-sentiment-rm: a tiny sentiment reward model

A Bradley-Terry reward model: `LlamaForSequenceClassification` (num_labels=1) initialised from the
`{cfg["base"]}` causal LM (llama2.c stories260K, TinyStories) with a fresh one-output `score` head, then
fine-tuned as a whole so that positive sentences score higher than negative ones. Higher score = more
positive. It is the reward the polyalign quickstart optimises with RLOO. Use it as
`polyalign.rewards.build_reward("model:stories260K-sentiment-rm")` (scores prompt + completion; see
`polyalign/rewards/model.py`).

## Data
UCI "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015), shipped in `polyalign/assets/sentiment/`:
3,000 review sentences (Amazon, IMDB, Yelp), 50% positive. Split 80/10/10 train/val/test, stratified by
(source, label), seeded shuffle (`polyalign.recipes.sentiment_data.split_sentiment(seed={cfg["seed"]})`).
Training pairs: a random positive (chosen) with a random negative (rejected), re-drawn every epoch.

## Training
Loss -log sigmoid(s_chosen - s_rejected); AdamW lr {cfg["lr"]} (linear warmup, cosine decay to 10%),
weight decay {cfg["weight_decay"]}, {cfg["epochs"]} epochs of {cfg["batch_size"]} pairs per step
({metrics["steps"]} steps), max {cfg["max_length"]} tokens, seed {cfg["seed"]}, fp32 on CPU ({metrics["seconds"]} s).

## Results
Pairwise accuracy = fraction of all (positive, negative) sentence pairs of the split ranked correctly
(ROC AUC). Pointwise accuracy = [score > {metrics["threshold"]:.4f}] (threshold chosen on train).

| split | sentences | pairwise accuracy | pointwise accuracy |
|---|---|---|---|
{rows}

**Held-out (test) pairwise accuracy: {metrics["test"]["pairwise_accuracy"]:.4f}.**

Transfer to story text (hand-written probes, never used for training or selection):

| positive | score | negative | score |
|---|---|---|---|
{probes}

Limits: English only; trained on short review sentences, so story-level scores are a rough signal; a
policy optimised against it will find its blind spots (use a KL penalty).

## Licence
Weights: derived from stories260K (Andrej Karpathy, llama2.c / tinyllamas, MIT). Training data:
UCI Sentiment Labelled Sentences, CC BY 4.0 (cite Kotzias et al. 2015).

## Reproduce
```
{reproduce_command(cfg, out_dir)}
```
(also `bash scripts/train_sentiment_rm.sh`; `metrics.json` holds every number above.)
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a Bradley-Terry sentiment reward model.")
    parser.add_argument("--base", default="stories260K", help="causal LM to start from (name or path)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 = deterministic, shared CPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train_reward_model(
        base=args.base,
        out_dir=args.out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        max_steps=args.max_steps,
    )


if __name__ == "__main__":
    main()
