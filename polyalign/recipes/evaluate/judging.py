"""Judging in `polyalign eval`: the run's judges, the judging phases, and progress lines.

- `build_judges(cfg, out_dir, metrics)`: the harm and pairwise judges one run needs, over one shared chat
  client for an LLM judge (its call counts and cache go into the report);
- `judge_harm`, `judge_pairs`, `judge_exact`: one record per item, appended to judgements.jsonl after every
  chunk, so a stopped run keeps what it judged. A verdict the judge could not give (status "unparseable" or
  "error", see `polyalign.eval.judges`) is recorded with its reason and counted, never guessed;
- `ProgressLine`: `polyalign eval: <phase> done/total (rate/s)` lines (train/logging.py's, with this prefix).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from polyalign.data.io import JsonlWriter
from polyalign.eval import judges as J
from polyalign.eval.backends import ChatClient
from polyalign.eval.config import JudgeConfig
from polyalign.recipes.evaluate.build import build_chat_client, build_judge
from polyalign.recipes.evaluate.prompts import EvalPrompt, exact_match, extract_final_integer
from polyalign.train.logging import ProgressLine as _ProgressLine

ProgressLine = functools.partial(_ProgressLine, prefix="polyalign eval")


@dataclass(frozen=True)
class Judges:
    """The judges of one eval run; `client` is the ChatClient of an LLM judge (None for the offline ones),
    `max_chars` the cut applied to completions in its prompts (0 = none)."""

    harm: J.PointwiseJudge | None = None
    pairwise: J.PairwiseJudge | None = None
    client: ChatClient | None = None
    max_chars: int = 0

    def describe(self) -> str:
        parts = {j.describe() for j in (self.harm, self.pairwise) if j is not None}
        return " | ".join(sorted(parts)) or "none (exact match only)"

    def notes(self, languages: set[str]) -> list[str]:
        """What the reader must know about the judge for these languages (lexicon coverage)."""
        if not hasattr(self.harm, "coverage"):
            return []
        english_only = [lang for lang in sorted(languages) if self.harm.coverage(lang) == "en-only"]
        own = [lang for lang in sorted(languages) if lang not in english_only]
        note = (
            "the lexicon judge is a crude proxy (a listed offensive word = harmful): it misses harm in clean "
            f"words and flags innocent uses. Languages with their own word list (plus English): {own or 'none'}"
        )
        if english_only:
            note += f"; judged with the English list only: {english_only} (no word list of their own)"
        return [note + "."]


def build_judges(cfg: JudgeConfig, out_dir: str | Path, metrics: set[str]) -> Judges:
    """The judges the metrics need (the config checks that the kind can: the lexicon judges harm only, a
    reward model compares only, an LLM judge does both over one shared client)."""
    if not metrics & {"harm", "win_rate"}:
        return Judges()
    client = build_chat_client(cfg, out_dir) if cfg.kind in ("openai", "hf") else None

    def make(role: str, template: str | None):
        return build_judge(
            cfg, role, out_dir, client, template, cfg.system, cfg.max_tokens, cfg.tie_margin, cfg.max_chars
        )

    return Judges(
        harm=make("harm", cfg.harm_template) if "harm" in metrics else None,
        pairwise=make("pairwise", cfg.pairwise_template) if "win_rate" in metrics else None,
        client=client,
        max_chars=cfg.max_chars if client is not None else 0,
    )


def base_record(p: EvalPrompt) -> dict:
    return {
        "id": p.id,
        "language": p.language,
        "harm_category": p.harm_category,
        "categories": list(p.categories),
        "global_or_local": p.global_or_local,
        "prompt": p.prompt,
    }


def _judged(j: J.Judgement, extra: dict) -> dict:
    return {
        "verdict": j.verdict,
        "score": j.score,
        "status": j.status,
        "raw": list(j.raw),
        "detail": j.detail,
        **extra,
    }


def _chunks(items: list, size: int, progress: ProgressLine):
    for start in range(0, len(items), size):
        yield items[start : start + size]
        progress.advance(len(items[start : start + size]))


def judge_harm(
    judge, prompts: list[EvalPrompt], completions: dict, side: str, writer: JsonlWriter, size: int
) -> list[dict]:
    records = []
    for chunk in _chunks(prompts, size, ProgressLine(f"judging harm ({side})", len(prompts), "completions")):
        texts = [completions[p.id] for p in chunk]
        verdicts = judge.judge([p.prompt for p in chunk], texts, [p.language for p in chunk])
        batch = [
            {
                "metric": "harm",
                "side": side,
                **base_record(p),
                "completion": c,
                **_judged(v, {"harmful": None if v.verdict is None else v.verdict == "yes"}),
            }
            for p, c, v in zip(chunk, texts, verdicts)
        ]
        writer.write(batch)
        records += batch
    return records


def judge_pairs(
    judge, prompts: list[EvalPrompt], model: dict, base: dict, writer: JsonlWriter, size: int
) -> list[dict]:
    outcome = {"A": "win", "B": "loss", "tie": "tie", None: None}
    records = []
    for chunk in _chunks(prompts, size, ProgressLine("judging pairs", len(prompts), "pairs")):
        a, b = [model[p.id] for p in chunk], [base[p.id] for p in chunk]
        verdicts = judge.compare([p.prompt for p in chunk], a, b, [p.language for p in chunk])
        batch = [
            {
                "metric": "win_rate",
                **base_record(p),
                "completion": ca,
                "baseline_completion": cb,
                **_judged(v, {"outcome": outcome[v.verdict]}),
            }
            for p, ca, cb, v in zip(chunk, a, b, verdicts)
        ]
        writer.write(batch)
        records += batch
    return records


def judge_exact(prompts: list[EvalPrompt], completions: dict, side: str, writer: JsonlWriter) -> list[dict]:
    missing = [p.id for p in prompts if p.answer is None]
    if missing:
        raise ValueError(
            f"metrics exact_match: prompt {missing[0]} has no answer (use mgsm or a file with 'answer')"
        )
    records = [
        {
            "metric": "exact_match",
            "side": side,
            **base_record(p),
            "completion": completions[p.id],
            "answer": p.answer,
            "predicted": extract_final_integer(completions[p.id]),
            "correct": exact_match(completions[p.id], p.answer),
        }
        for p in prompts
    ]
    writer.write(records)
    return records
