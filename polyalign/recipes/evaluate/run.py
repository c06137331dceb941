"""`polyalign eval CONFIG.yaml [--section.key=value ...]`: evaluate a model (or a file of its completions) on
a prompt set with a judge, and write a report.

    polyalign eval configs/eval/xsafety-lexicon.yaml --model.model=stories260K --out_dir=runs/eval

Phases of `run_eval(cfg)`, in order:
1. prompts: shipped XSafety / MGSM, or a file: a row per prompt (the Aya red-teaming layout) or a column per
   language (MultiJail's layout, `prompts.layout: wide`), columns renamed by `prompts.columns` (`prompts.py`);
2. completions for the model and the optional baseline: generated with HFEngine (greedy by default) or read
   from a JSONL/JSON/CSV file with `prompt` and `completion` columns (matched to the prompt set by prompt
   text). Prompts longer than a model's context are skipped and counted (`generation.too_long: skip`) or an
   error (`error`); a prompt skipped for one side is dropped for both;
3. judging, per metric in `metrics`: `harm` (a pointwise harm judge on every completion), `win_rate` (the
   pairwise judge, model = A vs baseline = B, in both orders), `exact_match` (the final integer vs the
   prompt's answer; no judge) (`judging.py`). Judgements are appended to `judgements.jsonl` after every
   chunk, and LLM requests land in the judge cache as they are answered, so a stopped run keeps what it did.
   A judge request that fails for good is an "error" verdict, counted like an unparseable one;
4. metrics (`metrics.py`) into `summary.json`: every rate with its n (the verdicts it rests on) and the
   total, unparseable and error counts beside it; `report.md` + `report.html` with plots (`report.py`).
Generation and judging print `done/total (rate)` progress lines when they take more than a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from polyalign.config import ConfigError, check, dump_yaml, load_config
from polyalign.data.io import DataError, JsonlWriter, get_field, read_table
from polyalign.eval.backends import HFChatBackend
from polyalign.files import atomic_write_text
from polyalign.recipes.evaluate import metrics
from polyalign.recipes.evaluate.config import EvalRunConfig, GenerationConfig, SideConfig
from polyalign.recipes.evaluate.judging import (
    Judges,
    ProgressLine,
    base_record,
    build_judges,
    judge_exact,
    judge_harm,
    judge_pairs,
)
from polyalign.recipes.evaluate.prompts import (
    EvalPrompt,
    load_mgsm,
    load_prompt_file,
    load_wide_file,
    load_xsafety,
)
from polyalign.recipes.evaluate.report import headline, write_eval_report
from polyalign.threads import apply_threads


def load_prompts(cfg: EvalRunConfig) -> tuple[list[EvalPrompt], str]:
    """The prompt set and a one-line description of it."""
    p = cfg.prompts
    langs = p.languages or None
    if p.source == "xsafety":
        cats = p.categories or None
        return (
            load_xsafety(langs, cats, p.per_group),
            f"XSafety {p.languages or 'all languages'}, "
            f"{p.categories or 'the 13 unsafe categories'}, first {p.per_group or 'all'} per group",
        )
    check(not p.categories, "prompts.categories applies to xsafety only")
    if p.source == "mgsm":
        return load_mgsm(
            langs, p.per_group
        ), f"MGSM {p.languages or 'all languages'}, first {p.per_group or 'all'}"
    source = p.source or cfg.model.completions
    first = f"first {p.per_group} per (language, category)" if p.per_group else "all prompts"
    if p.layout == "wide":
        prompts, empty = load_wide_file(source, langs, p.per_group, p.columns)
        return prompts, f"file {source} (a column per language; {empty} empty cells skipped), {first}"
    return load_prompt_file(source, langs, p.per_group, p.columns), f"file {source}, {first}"


def read_completions(path: str, prompts: list[EvalPrompt]) -> dict[str, str]:
    """{prompt id: completion} from a file with `prompt` and `completion` columns, matched by prompt text."""
    table = read_table(path)
    by_text: dict[str, str] = {}
    for row, loc in zip(table.rows, table.locations):
        where = f"{path}: {loc}"
        prompt, completion = get_field(row, "prompt", where), get_field(row, "completion", where)
        if not isinstance(completion, str):
            raise DataError(
                f"{where}: field 'completion': expected a string, got {type(completion).__name__}"
            )
        if by_text.get(prompt, completion) != completion:
            raise DataError(f"{where}: field 'prompt': a second, different completion for the same prompt")
        by_text[prompt] = completion
    missing = [p for p in prompts if p.prompt not in by_text]
    if missing:
        raise DataError(
            f"{path}: no completion for {len(missing)} prompt(s), "
            f"e.g. {missing[0].id}: {missing[0].prompt[:80]!r}"
        )
    return {p.id: by_text[p.prompt] for p in prompts}


def generate(
    model_name: str, prompts: list[EvalPrompt], g: GenerationConfig, seed: int
) -> tuple[dict, list[str]]:
    """({prompt id: completion}, ids skipped as too long), from the local generator, batch b seeded seed + b."""
    from polyalign.types import Sampling

    chat = HFChatBackend.load(model_name, g.device, g.chat_template)
    texts = {p.id: chat.render(p.prompt) for p in prompts}
    skipped = [i for i, t in texts.items() if not chat.fits(t, g.max_new_tokens)]
    if skipped and g.too_long == "error":
        raise ValueError(
            f"{len(skipped)} prompt(s) do not fit {model_name}'s context of {chat.context_length} tokens with "
            f"max_new_tokens={g.max_new_tokens}, e.g. {skipped[0]}; set generation.too_long: skip"
        )
    ids = [p.id for p in prompts if p.id not in set(skipped)]
    out: dict[str, str] = {}
    progress = ProgressLine(f"generating ({model_name})", len(ids), "prompts")
    for b, start in enumerate(range(0, len(ids), g.batch_size)):
        batch = ids[start : start + g.batch_size]
        sampling = Sampling(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, seed=seed + b
        )
        out.update(zip(batch, chat.generate([texts[i] for i in batch], 1, sampling).completions))
        progress.advance(len(batch))
    return out, skipped


def _counts(records: list[dict], value: str) -> dict:
    """n (records with a measured `value`) beside the total and the reasons for the rest."""
    status = [r.get("status", "ok") for r in records]
    return {
        "n": sum(r[value] is not None for r in records),
        "total": len(records),
        "unparseable": status.count("unparseable"),
        "errors": status.count("error"),
        "not_covered": status.count("not_covered"),
    }


def _by(records: list[dict], key: str, estimate) -> dict:
    """{group: estimate dict with its total (records of the group, measured or not)}; unmeasured absent."""
    totals = Counter(str(r[key]) for r in records if r.get(key) is not None)
    return {g: {**e.as_dict(), "total": totals[g]} for g, e in estimate(records, key).items()}


def _estimates(records: list[dict], value: str, kw: dict) -> dict:
    """overall + by_language / by_label / by_category estimates of a boolean field, with the counts."""
    est = lambda rs, key: metrics.harm_rates_by(rs, key, value, **kw)
    overall = metrics.rate_estimate([r[value] for r in records], **kw)
    return {
        "overall": overall.as_dict() if overall else None,
        **_counts(records, value),
        "by_language": _by(records, "language", est),
        "by_label": _by(records, "global_or_local", est),
        "by_category": _by(records, "harm_category", est),
    }


def harm_summary(per_side: dict[str, list[dict]], kw: dict) -> dict:
    sides = {side: _estimates(records, "harmful", kw) for side, records in per_side.items()}
    out: dict = {"sides": sides}
    if "baseline" in sides:
        values = lambda s, key: {g: e["value"] for g, e in s[key].items()}
        m, b = sides["model"], sides["baseline"]
        out["relative_reduction"] = {
            key: metrics.relative_reduction(values(b, key), values(m, key))
            for key in ("by_language", "by_label", "by_category")
        }
        if m["overall"] and b["overall"]:
            out["relative_reduction"]["overall"] = metrics.relative_reduction(
                {"all": b["overall"]["value"]}, {"all": m["overall"]["value"]}
            )["all"]
    return out


def win_summary(records: list[dict], tie_policy: str, kw: dict) -> dict:
    by_language = _by(
        records, "language", lambda rs, key: metrics.win_rates_by(rs, key, tie_policy=tie_policy, **kw)
    )
    overall = metrics.win_rate_estimate([r["outcome"] for r in records], tie_policy, **kw)
    return {
        "tie_policy": tie_policy,
        "overall": overall.as_dict() if overall else None,
        **_counts(records, "outcome"),
        "by_language": by_language,
        "macro_mean": metrics.macro_mean({g: e["value"] for g, e in by_language.items()}),
        "disagreements": sum(r["detail"].startswith("orders disagree") for r in records),
    }


def judge_summary(judges: Judges, completions: dict) -> dict:
    """How the judge was asked: its cache, request counts and the completions cut in its prompts."""
    if judges.client is None:
        return {"judge_cache": None}
    c = judges.client
    cut = sum(len(text) > judges.max_chars > 0 for side in completions.values() for text in side.values())
    return {
        "judge_cache": str(c.cache.path) if c.cache is not None else None,
        "judge_calls": dict(c.stats),
        "judge_prompts": {"max_chars": judges.max_chars, "completions_cut": cut},
    }


def side_label(side: SideConfig) -> str:
    return side.label or side.model or Path(side.completions or "").name


def collect_completions(cfg: EvalRunConfig, prompts: list[EvalPrompt]) -> tuple[dict, list[EvalPrompt], int]:
    """({side: {id: completion}}, prompts kept on every side, number skipped as too long)."""
    sides = {"model": cfg.model}
    if cfg.baseline.model is not None or cfg.baseline.completions is not None:
        sides["baseline"] = cfg.baseline
    completions, skipped = {}, set()
    for name, side in sides.items():
        if side.completions is not None:
            completions[name] = read_completions(side.completions, prompts)
        else:
            g = cfg.generation
            g = g if side.temperature is None else dataclasses.replace(g, temperature=side.temperature)
            completions[name], too_long = generate(side.model, prompts, g, cfg.seed)
            skipped |= set(too_long)
    kept = [p for p in prompts if p.id not in skipped]
    if not kept:
        raise ValueError("no prompt left to evaluate: every prompt was longer than the model's context")
    return completions, kept, len(skipped)


def run_eval(cfg: EvalRunConfig) -> dict:
    """Run an evaluation (module docstring); returns the summary written to out_dir/summary.json."""
    apply_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    prompts, description = load_prompts(cfg)
    completions, prompts, skipped = collect_completions(cfg, prompts)
    JsonlWriter(out / "completions.jsonl", append=False).write(
        [
            {"side": s, **base_record(p), "completion": c[p.id]}
            for s, c in completions.items()
            for p in prompts
        ]
    )
    judges = build_judges(cfg.judge, out, set(cfg.metrics))
    kw = {"n_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.seed}
    summary: dict = {
        "model": side_label(cfg.model),
        "baseline": side_label(cfg.baseline) if "baseline" in completions else None,
        "prompt_set": description,
        "judge": judges.describe(),
        "judge_notes": judges.notes({p.language for p in prompts}),
        "counts": {"prompts": len(prompts), "skipped_too_long": skipped},
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.seed},
    }
    with JsonlWriter(out / "judgements.jsonl", append=False) as writer:
        if "exact_match" in cfg.metrics:
            per_side = {s: judge_exact(prompts, c, s, writer) for s, c in completions.items()}
            summary["exact_match"] = {s: _estimates(r, "correct", kw) for s, r in per_side.items()}
        if "harm" in cfg.metrics:
            per_side = {
                s: judge_harm(judges.harm, prompts, c, s, writer, cfg.chunk_size)
                for s, c in completions.items()
            }
            summary["harm"] = harm_summary(per_side, kw)
        if "win_rate" in cfg.metrics:
            records = judge_pairs(
                judges.pairwise,
                prompts,
                completions["model"],
                completions["baseline"],
                writer,
                cfg.chunk_size,
            )
            summary["win_rate"] = win_summary(records, cfg.tie_policy, kw)
    summary.update(judge_summary(judges, completions))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    summary["report"] = {k: str(v) for k, v in write_eval_report(summary, out).items()}
    return summary


def cli_eval(config_path: str | None, overrides: list[str] = ()) -> int:
    """`polyalign eval CONFIG [--a.b=c ...]`: run and print where the report is; bad config -> SystemExit."""
    try:
        cfg = load_config(config_path, list(overrides), cls=EvalRunConfig)
    except ConfigError as err:
        raise SystemExit(f"polyalign eval: {err}") from None
    summary = run_eval(cfg)
    print(f"polyalign eval: {'; '.join(headline(summary)) or 'done'}; report: {summary['report']['md']}")
    return 0
