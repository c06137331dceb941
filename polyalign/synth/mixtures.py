"""Training mixtures: general preference pairs plus a stated share of safety pairs (the Alignment Prism's
0%, 15% and 100% mixes, SPEC 2.3), optionally restricted to global-harm or local-harm safety pairs (the
global-only / local-only ablations) and to a set of languages.

Counts. With a requested share s of safety pairs and `total` T > 0: n_safety = round(s * T) (halves round
up), n_general = T - n_safety. With T = 0 the mixture is the largest one the data allows at that share:
T = min(floor(G / (1 - s)), floor(S / s)) for available general G and safety S pairs (s = 0: all general;
s = 1: all safety). Asking for more than is available is an error naming both numbers. The report gives the
counted share n_safety / (n_safety + n_general), which is what a test checks, not the requested one.
Selection is a seeded sample without replacement, and the mixture is shuffled with the same seed; every
record gets `mixture_part` = "general" | "safety".
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

from polyalign.files import write_jsonl_atomic

LABELS = ("all", "global", "local")


def mixture_counts(
    available_general: int, available_safety: int, safety_share: float, total: int = 0
) -> tuple[int, int]:
    """(n_general, n_safety) for a requested share (module docstring); ValueError when the data is short."""
    if not 0.0 <= safety_share <= 1.0:
        raise ValueError(f"safety_share must be in [0, 1], got {safety_share}")
    if total < 0:
        raise ValueError(f"total must be >= 0 (0 = as many as the data allows), got {total}")
    share = Fraction(str(safety_share))
    if total == 0:
        if share == 0:
            return available_general, 0
        if share == 1:
            return 0, available_safety
        total = min(math.floor(available_general / (1 - share)), math.floor(available_safety / share))
    n_safety = math.floor(share * total + Fraction(1, 2))
    n_general = total - n_safety
    if n_safety > available_safety or n_general > available_general:
        raise ValueError(
            f"mixture of {total} pairs at safety share {safety_share} needs {n_general} general and {n_safety} "
            f"safety pairs; available: {available_general} general, {available_safety} safety"
        )
    return n_general, n_safety


def select_safety(safety: list[dict], label: str) -> tuple[list[dict], int]:
    """Safety pairs with the requested global_or_local label ("all" keeps every pair); (kept, excluded)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if label == "all":
        return list(safety), 0
    kept = [p for p in safety if p.get("global_or_local") == label]
    if not kept and safety:
        labels = sorted({str(p.get("global_or_local")) for p in safety})
        raise ValueError(f"no safety pair is labelled {label!r} (labels present: {labels}); XSafety has none")
    return kept, len(safety) - len(kept)


def build_mixture(
    general: list[dict],
    safety: list[dict],
    safety_share: float,
    total: int = 0,
    label: str = "all",
    languages: list[str] | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """(mixture records, report). `languages` keeps pairs of those languages only (both parts)."""
    if languages:
        general = [p for p in general if p.get("language") in languages]
        safety = [p for p in safety if p.get("language") in languages]
    safety, excluded = select_safety(safety, label)
    n_general, n_safety = mixture_counts(len(general), len(safety), safety_share, total)
    rng = random.Random(seed)
    chosen = [{**p, "mixture_part": "general"} for p in rng.sample(general, n_general)]
    chosen += [{**p, "mixture_part": "safety"} for p in rng.sample(safety, n_safety)]
    rng.shuffle(chosen)
    size = n_general + n_safety
    report = {
        "requested_safety_share": safety_share,
        "label": label,
        "languages": list(languages or []),
        "seed": seed,
        "available": {"general": len(general), "safety": len(safety), "safety_excluded_by_label": excluded},
        "general": n_general,
        "safety": n_safety,
        "total": size,
        "safety_share": n_safety / size if size else None,
        "by_language": dict(sorted(Counter(p.get("language") for p in chosen).items())),
        "safety_by_label": dict(
            sorted(
                Counter(
                    p.get("global_or_local") or "unlabelled" for p in chosen if p["mixture_part"] == "safety"
                ).items()
            )
        ),
    }
    return chosen, report


def write_mixture(path: str | Path, records: list[dict], report: dict) -> Path:
    """Write the mixture (JSONL, atomically) and its report next to it (<name>.report.json)."""
    path = Path(path)
    write_jsonl_atomic(path, records)
    report_path = path.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report_path
