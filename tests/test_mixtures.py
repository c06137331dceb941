"""Safety mixtures: exact counted shares (0%, 15%, 100%), global-only / local-only, languages, errors."""

from __future__ import annotations

import json

import pytest

from polyalign.synth.mixtures import build_mixture, mixture_counts, write_mixture


def pairs(n: int, kind: str, labels: tuple = (None,), languages: tuple = ("en",)) -> list[dict]:
    return [
        {
            "id": f"{kind}{i}",
            "prompt": f"{kind} prompt {i}",
            "chosen": "c",
            "rejected": "r",
            "language": languages[i % len(languages)],
            "global_or_local": labels[i % len(labels)],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "share, total, expected",
    [(0.0, 0, (170, 0)), (1.0, 0, (0, 30)), (0.15, 0, (170, 30)), (0.15, 100, (85, 15)), (0.15, 10, (8, 2))],
)
def test_counts_by_hand(share, total, expected):
    """170 general, 30 safety: 15% -> the largest mix is min(170/0.85, 30/0.15) = 200 = 170 + 30;
    10 pairs at 15% -> round(1.5) = 2 safety (halves round up)."""
    assert mixture_counts(170, 30, share, total) == expected


def test_counts_errors():
    with pytest.raises(ValueError, match="needs 85 general and 15 safety pairs; available: 170 general, 10"):
        mixture_counts(170, 10, 0.15, 100)
    with pytest.raises(ValueError, match=r"safety_share must be in \[0, 1\]"):
        mixture_counts(1, 1, 1.5)


@pytest.mark.parametrize("share", [0.0, 0.15, 1.0])
def test_mixture_shares_are_exact_and_reported(share):
    general, safety = pairs(170, "g"), pairs(30, "s", ("global", "local"))
    records, report = build_mixture(general, safety, share, seed=3)
    n_safety = sum(r["mixture_part"] == "safety" for r in records)
    assert n_safety == report["safety"] and len(records) == report["total"]
    assert report["safety_share"] == n_safety / len(records) == share
    assert len({r["id"] for r in records}) == len(records)  # sampled without replacement
    assert all(r["id"].startswith("s") == (r["mixture_part"] == "safety") for r in records)


def test_global_only_and_local_only():
    general, safety = pairs(100, "g"), pairs(40, "s", ("global", "global", "global", "local"))
    records, report = build_mixture(general, safety, 0.15, total=40, label="local")
    picked = [r for r in records if r["mixture_part"] == "safety"]
    assert len(picked) == 6 and all(r["global_or_local"] == "local" for r in picked)
    assert report["available"] == {"general": 100, "safety": 10, "safety_excluded_by_label": 30}
    assert report["safety_by_label"] == {"local": 6}
    _, report = build_mixture(general, safety, 0.15, total=40, label="global")
    assert report["safety_by_label"] == {"global": 6}
    with pytest.raises(ValueError, match="no safety pair is labelled 'local'"):
        build_mixture(general, pairs(5, "s"), 0.15, total=20, label="local")


def test_languages_seed_and_file(tmp_path):
    general = pairs(60, "g", languages=("en", "fr", "hi"))
    safety = pairs(30, "s", languages=("en", "fr", "hi"))
    a, report = build_mixture(general, safety, 0.5, total=20, languages=["en", "hi"], seed=1)
    assert {r["language"] for r in a} == {"en", "hi"} and report["available"]["general"] == 40
    b, _ = build_mixture(general, safety, 0.5, total=20, languages=["en", "hi"], seed=1)
    c, _ = build_mixture(general, safety, 0.5, total=20, languages=["en", "hi"], seed=2)
    assert a == b and a != c
    report_path = write_mixture(tmp_path / "mix.jsonl", a, report)
    lines = (tmp_path / "mix.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(report_path.read_text())["safety_share"] == 0.5
