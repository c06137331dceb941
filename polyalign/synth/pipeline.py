"""`polyalign synth CONFIG.yaml [--section.key=value ...]`: build multilingual preference pairs.

    polyalign synth configs/synth/stories-tiny.yaml --out_dir=runs/synth/tiny

Files in `out_dir`, in stage order (see `stages.py`; the first three are resumable appends):
    prompts.jsonl      source prompts and their translations (stage translate)
    completions.jsonl  one completion per prompt and generator (stage generate)
    scored.jsonl       the completions with their judge scores (stage score)
    pairs.jsonl        best vs worst per prompt (stage pair; rewritten atomically)
    final.jsonl        after filtering and deduplication: the training file ({prompt, chosen, rejected,
                       language, chosen_score, rejected_score, ...}, read by `load_preferences`)
    summary.json       counts of every stage: done / resumed, skips by reason, language mismatches
Run the same command again after a crash (even kill -9) or a failed endpoint: it repairs a torn last line,
skips every record already written and continues; nothing finished is lost or duplicated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from polyalign.config import ConfigError, dump_yaml, load_config
from polyalign.files import write_jsonl_atomic
from polyalign.synth import stages
from polyalign.synth.config import SynthConfig
from polyalign.synth.safety import load_redteam_prompts
from polyalign.synth.store import check_unique_ids, read_stage


def load_sources(cfg: SynthConfig) -> list[dict]:
    """Source prompt records from `cfg.source`; duplicate ids are an error, unknown languages too."""
    s = cfg.source
    if s.path == "builtin:stories":
        from polyalign.data.prompts import load_prompts

        texts = load_prompts("builtin:stories").prompts
        records = [stages.source_record(f"stories/{i}", t, s.language) for i, t in enumerate(texts)]
        if s.languages and s.language not in s.languages:
            records = []
    else:
        records = load_redteam_prompts(s.path, s.languages or None, s.categories or None, s.per_group)
    records = records[: s.limit] if s.limit else records
    if not records:
        raise ValueError(f"source {s.path}: no prompts left after the filters (languages {s.languages})")
    check_unique_ids(records, s.path)
    return records


def _stage(name: str, path: Path, call) -> dict:
    """Run one resumable stage; on failure say what is kept and how to continue."""
    try:
        return call()
    except Exception as err:
        kept = len(read_stage(path))
        raise RuntimeError(
            f"synth stage {name!r} failed: {err}. The {kept} record(s) finished so far are kept in {path}; "
            "fix the cause and run the same command again to continue"
        ) from err


def run_synth(
    cfg: SynthConfig,
    generators: list[Any] | None = None,
    translator: Any | None = None,
    scorer: Any | None = None,
    sources: list[dict] | None = None,
) -> dict:
    """Run every stage (module docstring); returns the summary written to out_dir/summary.json. Generators,
    translator, scorer and sources are built from the config unless given (tests pass scripted ones)."""
    from polyalign.synth import backends

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    sources = load_sources(cfg) if sources is None else sources
    check_unique_ids(sources, "sources")
    t = cfg.translate
    if translator is None and t.languages:
        translator = backends.build_translator(t.translator, t.template, out)
    paths = {name: out / f"{name}.jsonl" for name in ("prompts", "completions", "scored")}
    summary: dict = {"config": str(out / "config.yaml"), "sources": len(sources), "stages": {}}
    summary["stages"]["translate"] = _stage(
        "translate",
        paths["prompts"],
        lambda: stages.translate_prompts(
            sources, t.languages, translator, paths["prompts"], cfg.batch_size, t.keep_source, cfg.progress
        ),
    )
    prompts = read_stage(paths["prompts"])
    generators = generators or [backends.build_generator(g, out) for g in cfg.generators]
    seeds = {g.label: g.seed for g in cfg.generators}
    summary["stages"]["generate"] = _stage(
        "generate",
        paths["completions"],
        lambda: stages.generate_completions(
            prompts, generators, paths["completions"], cfg.batch_size, cfg.progress, seeds
        ),
    )
    completions = read_stage(paths["completions"])
    scorer = scorer or backends.build_scorer(cfg.judge, out)
    summary["stages"]["score"] = _stage(
        "score",
        paths["scored"],
        lambda: stages.score_completions(completions, scorer, paths["scored"], cfg.batch_size, cfg.progress),
    )
    scored = read_stage(paths["scored"])
    final = pair_and_filter(cfg, scored, summary)
    summary.update(_counts(prompts, completions, scored, final))
    summary["backends"] = {
        "translator": translator.describe() if translator else None,
        "generators": {g.name: g.describe() for g in generators},
        "judge": f"{scorer.name}: {scorer.describe()}",
    }
    summary["final"] = str(out / "final.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def pair_and_filter(cfg: SynthConfig, scored: list[dict], summary: dict) -> list[dict]:
    """The pure stages: pairs.jsonl and final.jsonl (each rewritten atomically); counts go into summary."""
    out = Path(cfg.out_dir)
    pairs, pair_counts = stages.build_pairs(scored, cfg.pairs.min_margin)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    f = cfg.filter
    final, filter_counts = stages.filter_pairs(pairs, f.language_mismatch, f.dedupe, f.max_chars)
    write_jsonl_atomic(out / "final.jsonl", final)
    summary["stages"]["pair"], summary["stages"]["filter"] = dict(pair_counts), dict(filter_counts)
    return final


def _counts(prompts: list[dict], completions: list[dict], scored: list[dict], final: list[dict]) -> dict:
    """Language mismatches, empty generations, unscored completions and pairs per language."""
    mismatch = lambda rows, key: dict(Counter(r["language"] for r in rows if r[key] == "mismatch"))
    return {
        "prompts": len(prompts),
        "completions": len(completions),
        "language_mismatch": {
            "source_prompts": mismatch([p for p in prompts if p["origin"] == "source"], "language_check"),
            "translations": mismatch([p for p in prompts if p["origin"] == "translation"], "language_check"),
            "completions": mismatch(completions, "language_check"),
        },
        "empty_completions": sum(c["status"] == "empty" for c in completions),
        "unscored": dict(Counter(s["score_status"] for s in scored if s["score"] is None)),
        "pairs_by_language": dict(sorted(Counter(p["language"] for p in final).items())),
    }


def cli_synth(config_path: str | None, overrides: list[str] = ()) -> int:
    """`polyalign synth CONFIG [--a.b=c ...]`: run the pipeline and print the counts; bad config -> SystemExit."""
    try:
        cfg = load_config(config_path, list(overrides), cls=SynthConfig)
    except ConfigError as err:
        raise SystemExit(f"polyalign synth: {err}") from None
    summary = run_synth(cfg)
    mism = {k: sum(v.values()) for k, v in summary["language_mismatch"].items()}
    print(
        f"polyalign synth: {summary['prompts']} prompts, {summary['completions']} completions, "
        f"{summary['stages']['filter']['kept']} pairs {summary['pairs_by_language']}; language mismatches "
        f"{mism}; empty completions {summary['empty_completions']}; final: {summary['final']}"
    )
    return 0
