"""`polyalign synth CONFIG.yaml [--section.key=value ...]`: build multilingual preference pairs.

    polyalign synth configs/synth/stories-tiny.yaml --out_dir=runs/synth/tiny [--force-stage generate]

Paths in the config (source.path) are relative to the config file (`paths.py`).

Files in `out_dir`, in stage order (see `stages.py`; the first three are resumable appends):
    prompts.jsonl      source prompts and their translations (stage translate)
    completions.jsonl  one completion per prompt and generator (stage generate)
    scored.jsonl       the completions with their judge scores (stage score)
    pairs.jsonl        best vs worst per prompt (stage pair; rewritten atomically)
    final.jsonl        after filtering and deduplication: the training file ({prompt, chosen, rejected,
                       language, chosen_score, rejected_score, ...}, read by `load_preferences`)
    summary.json       counts of every stage: done / resumed, skips by reason, language mismatches
    fingerprints.json  the settings behind every record fingerprint ever written here (see fingerprints.py)
Run the same command again after a crash (even kill -9) or a failed endpoint: it drops a torn last line,
skips every record already written and continues; nothing finished is lost or duplicated, and every record
gets the seed an uninterrupted run gives it (seeds are per record id). A rerun with settings that differ from
those of the records already written refuses, naming the stage and the changed keys; `--force-stage NAME`
redoes that stage and the ones after it (translate, generate, score, pair, filter).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from polyalign.config import ConfigError, dump_yaml
from polyalign.files import atomic_write_text, write_jsonl_atomic
from polyalign.synth import fingerprints, stages
from polyalign.synth.config import SynthConfig
from polyalign.synth.paths import SYNTH_PATHS, load_config_at
from polyalign.synth.safety import load_redteam_prompts, select_sources
from polyalign.synth.sources import read_prompt_file
from polyalign.synth.store import check_unique_ids, read_stage
from polyalign.threads import apply_threads


def load_sources(cfg: SynthConfig) -> tuple[list[dict], int]:
    """(source prompt records from `cfg.source`, empty cells skipped in a wide file); duplicate ids and
    unknown languages are errors."""
    s = cfg.source
    empty = 0
    if s.path == "builtin:stories":
        from polyalign.data.prompts import load_prompts

        texts = load_prompts("builtin:stories").prompts
        records = [stages.source_record(f"stories/{i}", t, s.language) for i, t in enumerate(texts)]
        if s.languages and s.language not in s.languages:
            records = []
    elif s.path == "xsafety":
        records = load_redteam_prompts("xsafety", s.languages or None, s.categories or None, s.per_group)
    else:
        records, empty = read_prompt_file(s.path, s.layout, s.columns, s.language)
        records = select_sources(records, str(s.path), s.languages, s.categories, s.per_group)
    records = records[: s.limit] if s.limit else records
    if not records:
        raise ValueError(f"source {s.path}: no prompts left after the filters (languages {s.languages})")
    check_unique_ids(records, s.path)
    return records, empty


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


def _prepare(cfg: SynthConfig, force_stage: str | None) -> tuple[Path, dict]:
    """out_dir with the forced stage's files removed, the current stage settings registered and checked
    against the records already there (SettingsChanged), then config.yaml; returns (out_dir, settings)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if force_stage is not None:
        fingerprints.force_stage(out, force_stage)
    settings = fingerprints.stage_settings(cfg)
    registry = fingerprints.update_registry(out, settings)
    for stage, name in fingerprints.FILES.items():  # refuse before anything runs, earliest stage first
        fingerprints.check_stage(stage, out / name, settings[stage], registry)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return out, settings


def run_synth(
    cfg: SynthConfig,
    generators: list[Any] | None = None,
    translator: Any | None = None,
    scorer: Any | None = None,
    sources: list[dict] | None = None,
    force_stage: str | None = None,
) -> dict:
    """Run every stage (module docstring); returns the summary written to out_dir/summary.json. Generators,
    translator, scorer and sources are built from the config unless given (tests pass scripted ones).
    `force_stage` redoes that stage and every later one; otherwise changed settings are refused."""
    from polyalign.synth import backends

    apply_threads(cfg.threads)
    out, settings = _prepare(cfg, force_stage)
    fp = fingerprints.stage_fingerprints(settings)
    sources, empty = load_sources(cfg) if sources is None else (sources, 0)
    check_unique_ids(sources, "sources")
    t = cfg.translate
    if translator is None and t.languages:
        translator = backends.build_translator(t.translator, t.template, out)
    paths = {name: out / file for name, file in fingerprints.FILES.items()}
    summary: dict = {"config": str(out / "config.yaml"), "sources": len(sources), "stages": {}}
    summary["source_empty_cells"] = empty
    summary["stages"]["translate"] = _stage(
        "translate",
        paths["translate"],
        lambda: stages.translate_prompts(
            sources, t.languages, translator, paths["translate"], cfg.batch_size, t.keep_source,
            cfg.progress, fp["translate"][""], t.translator.seed,
        ),
    )  # fmt: skip
    prompts = read_stage(paths["translate"])
    generators = generators or [backends.build_generator(g, out) for g in cfg.generators]
    seeds = {g.label: g.seed for g in cfg.generators}
    summary["stages"]["generate"] = _stage(
        "generate",
        paths["generate"],
        lambda: stages.generate_completions(
            prompts, generators, paths["generate"], cfg.batch_size, cfg.progress, seeds, fp["generate"]
        ),
    )
    completions = read_stage(paths["generate"])
    scorer = scorer or backends.build_scorer(cfg.judge, out)
    summary["stages"]["score"] = _stage(
        "score",
        paths["score"],
        lambda: stages.score_completions(
            completions, scorer, paths["score"], cfg.batch_size, cfg.progress, fp["score"]
        ),
    )
    return _finish(
        cfg, summary, prompts, completions, read_stage(paths["score"]), (translator, generators, scorer)
    )


def _finish(cfg: SynthConfig, summary: dict, prompts, completions, scored, backends_used) -> dict:
    """Pair, filter, count, and write summary.json."""
    out = Path(cfg.out_dir)
    translator, generators, scorer = backends_used
    final = pair_and_filter(cfg, scored, summary)
    summary.update(_counts(prompts, completions, scored, final))
    summary["backends"] = {
        "translator": translator.describe() if translator else None,
        "generators": {g.name: g.describe() for g in generators},
        "judge": f"{scorer.name}: {scorer.describe()}",
    }
    summary["final"] = str(out / "final.jsonl")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
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


def cli_synth(config_path: str | None, overrides: list[str] = (), force_stage: str | None = None) -> int:
    """`polyalign synth CONFIG [--force-stage NAME] [--a.b=c ...]`: run the pipeline and print the counts; a bad
    config or settings that differ from those of the records in out_dir -> SystemExit with one line."""
    try:
        cfg = load_config_at(config_path, list(overrides), SynthConfig, SYNTH_PATHS)
        summary = run_synth(cfg, force_stage=force_stage)
    except (ConfigError, fingerprints.SettingsChanged) as err:
        raise SystemExit(f"polyalign synth: {err}") from None
    mism = {k: sum(v.values()) for k, v in summary["language_mismatch"].items()}
    print(
        f"polyalign synth: {summary['prompts']} prompts, {summary['completions']} completions, "
        f"{summary['stages']['filter']['kept']} pairs {summary['pairs_by_language']}; language mismatches "
        f"{mism}; empty completions {summary['empty_completions']}; final: {summary['final']}"
    )
    return 0
