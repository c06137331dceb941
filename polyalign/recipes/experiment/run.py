"""`polyalign experiment CONFIG.yaml [--section.key=value ...]`: the cross-lingual transfer experiment
(SPEC 3.3-3.5) and the safety-mixture experiment (SPEC 2.3-2.5) in one loop.

    polyalign experiment configs/experiment/transfer-tiny.yaml --out_dir=runs/experiment/tiny

Files named in the config (synth configs, pairs, trainer configs, evaluation prompts) are relative to it, so
the command works from any folder. Evaluation prompts may be a wide (MultiJail) or column-mapped file
(`eval.layout`, `eval.columns`).

Phases of `run_experiment(cfg)`:
1. data: run the general (and optional safety) synth config, or read given pairs files;
2. training sets: one mixture per `train_sets` entry (languages, safety share, global/local label), written
   with its counted shares (`mixtures.py`);
3. training: every training set x method: dpo / sft_random / sft_chosen / dpo_sft through the offline
   trainer, rloo through the online trainer (on the set's prompts); a row whose model already exists is
   reused, so a rerun after a crash continues;
4. evaluation: greedy completions of the starting model and of every trained model on the evaluation prompts
   in every evaluation language, then `run_eval` per model for the harm rate (harm judge) and the win-rate
   against the starting model (pairwise judge);
5. report: training set x evaluation language matrices as Markdown tables + PNG heatmaps (`report.py`).
This module is an entry point like the CLI: it calls the trainers and the evaluator, nothing imports it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from polyalign.config import ConfigError, dump_yaml, load_config
from polyalign.data.io import read_records
from polyalign.files import write_jsonl_atomic
from polyalign.recipes.experiment.config import DataSource, ExperimentConfig, load_experiment_config
from polyalign.recipes.experiment.report import build_matrix, write_experiment_report
from polyalign.synth.mixtures import build_mixture, write_mixture
from polyalign.threads import apply_threads

BASE_ROW = "base"


def load_pairs(source: DataSource, name: str, out: Path) -> list[dict]:
    """Pairs from a synth run (run now; resumable) or a file; [] when the source is unset."""
    if source.synth is not None:
        from polyalign.synth.config import SynthConfig
        from polyalign.synth.paths import SYNTH_PATHS, load_config_at
        from polyalign.synth.pipeline import run_synth

        overrides = [f"out_dir={out / 'synth' / name}", *source.synth_overrides]
        summary = run_synth(load_config_at(source.synth, overrides, SynthConfig, SYNTH_PATHS))
        return read_records(summary["final"])
    return read_records(source.pairs) if source.pairs is not None else []


def build_train_sets(
    cfg: ExperimentConfig, general: list[dict], safety: list[dict], out: Path
) -> dict[str, dict]:
    """{set name: {"path", "prompts", "report"}}: the mixture file, a prompt file (for rloo) and the counts."""
    sets = {}
    for s in cfg.train_sets:
        records, report = build_mixture(
            general, safety, s.safety_share, s.size, s.safety_label, s.languages or None, cfg.seed
        )
        if not records:
            raise ValueError(f"train set {s.name}: no pairs (languages {s.languages}); check the data")
        path = out / "train_sets" / f"{s.name}.jsonl"
        write_mixture(path, records, report)
        prompts = out / "train_sets" / f"{s.name}.prompts.jsonl"
        unique = {r["prompt"]: r.get("language") for r in records}
        write_jsonl_atomic(prompts, [{"prompt": p, "language": lang} for p, lang in unique.items()])
        sets[s.name] = {"path": str(path), "prompts": str(prompts), "report": report}
    return sets


def _offline(cfg: ExperimentConfig, policy: str, data: str, loss: str, sft_target: str, run_dir: Path) -> str:
    """Train with the offline trainer; returns the exported model folder (reused when already there)."""
    from polyalign.config_offline import OfflineRunConfig

    if (run_dir / "model" / "config.json").is_file() and (run_dir / "summary.json").is_file():
        return str(run_dir / "model")
    from polyalign.train.offline import train_offline

    t = cfg.training
    base = load_config(t.offline, t.offline_overrides, cls=OfflineRunConfig)
    run_cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, policy=policy),
        data=dataclasses.replace(base.data, train=data),
        loss=dataclasses.replace(base.loss, name=loss, sft_target=sft_target),
        output=dataclasses.replace(base.output, run_dir=str(run_dir)),
    )
    return train_offline(run_cfg, overwrite=True)["model"]  # an incomplete run (no summary) starts afresh


def _online(cfg: ExperimentConfig, prompts: str, run_dir: Path) -> str:
    """RLOO with the online trainer on the set's prompts; exports the final policy to run_dir/model."""
    from polyalign.config import RunConfig

    export = run_dir / "model"
    if (export / "config.json").is_file() and (run_dir / "summary.json").is_file():
        return str(export)
    from polyalign.models import load_policy
    from polyalign.train.checkpoint import load_checkpoint
    from polyalign.train.online import train_online

    t = cfg.training
    base = load_config(t.online, t.online_overrides, cls=RunConfig)
    run_cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, policy=cfg.base_model),
        data=dataclasses.replace(base.data, prompts=prompts),
        algo=dataclasses.replace(base.algo, name="rloo"),
        output=dataclasses.replace(base.output, run_dir=str(run_dir)),
    )
    train_online(run_cfg, overwrite=True)  # an incomplete run (no summary) starts afresh
    model, tokenizer = load_policy(cfg.base_model)
    load_checkpoint(run_dir, {"policy": model}, restore_rng=False)
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    return str(export)


def train_one(cfg: ExperimentConfig, method: str, data: str, prompts: str, root: Path) -> str:
    """Train one method on one training set (files `data` pairs, `prompts` prompts) under `root`; returns
    the model folder. dpo_sft first trains (or reuses) root/sft_chosen."""
    if method == "dpo":
        return _offline(cfg, cfg.base_model, data, "dpo", "chosen", root / "dpo")
    if method in ("sft_random", "sft_chosen"):
        return _offline(cfg, cfg.base_model, data, "sft", method.removeprefix("sft_"), root / method)
    if method == "dpo_sft":
        sft = _offline(cfg, cfg.base_model, data, "sft", "chosen", root / "sft_chosen")
        return _offline(cfg, sft, data, "dpo", "chosen", root / "dpo_sft")
    return _online(cfg, prompts, root / "rloo")


def train_rows(cfg: ExperimentConfig, sets: dict[str, dict], out: Path) -> dict[str, str]:
    """{row name "<set>/<method>": trained model folder} in config order."""
    return {
        f"{s.name}/{method}": train_one(
            cfg, method, sets[s.name]["path"], sets[s.name]["prompts"], out / "train" / s.name
        )
        for s in cfg.train_sets
        for method in cfg.training.methods
    }


def _eval_prompt_source(cfg: ExperimentConfig, out: Path) -> str:
    """eval.prompts, or for a wide or column-mapped file the same prompts in the long layout, written to
    out/eval/source_prompts.jsonl (every category kept there as harm_categories, the first as harm_category)."""
    e = cfg.eval
    if e.layout == "long" and not e.columns:
        return e.prompts
    from polyalign.synth.sources import read_prompt_file

    records, _ = read_prompt_file(e.prompts, e.layout, e.columns)
    fields = ("id", "prompt", "language", "harm_category", "harm_categories", "global_or_local")
    path = out / "eval" / "source_prompts.jsonl"
    write_jsonl_atomic(path, [{k: r[k] for k in fields} for r in records])
    return str(path)


def _eval_prompts(cfg: ExperimentConfig, out: Path):
    from polyalign.recipes.evaluate.config import EvalRunConfig, PromptSetConfig
    from polyalign.recipes.evaluate.run import load_prompts

    e = cfg.eval
    source = _eval_prompt_source(cfg, out)
    prompt_set = PromptSetConfig(source, list(cfg.eval_languages), list(e.categories), e.per_group)
    prompts, _ = load_prompts(EvalRunConfig(prompts=prompt_set))
    seen, unique = set(), []
    for p in prompts:  # completions are matched to prompts by text, so each text once
        if p.prompt not in seen:
            seen.add(p.prompt)
            unique.append(p)
    return unique


def generate_all(cfg: ExperimentConfig, models: dict[str, str], out: Path) -> tuple[Path, dict[str, Path]]:
    """Greedy completions of every model on the evaluation prompts that fit every model's context; returns
    (the prompt file, {row: completions file})."""
    from polyalign.recipes.evaluate.run import generate

    prompts = _eval_prompts(cfg, out)
    completions, skipped = {}, set()
    for row, model in models.items():
        completions[row], too_long = generate(model, prompts, cfg.eval.generation, cfg.seed)
        skipped |= set(too_long)
    kept = [p for p in prompts if p.id not in skipped]
    if not kept:
        raise ValueError("experiment: every evaluation prompt is longer than the models' context")
    root = out / "eval"
    prompt_file = root / "prompts.jsonl"
    fields = ("prompt", "language", "harm_category", "global_or_local")
    write_jsonl_atomic(prompt_file, [{k: getattr(p, k) for k in fields} for p in kept])
    files = {}
    for row in models:
        files[row] = root / row.replace("/", "__") / "completions.jsonl"
        write_jsonl_atomic(
            files[row],
            [
                {"prompt": p.prompt, "language": p.language, "completion": completions[row][p.id]}
                for p in kept
            ],
        )
    return prompt_file, files


def evaluate_rows(
    cfg: ExperimentConfig, prompt_file: Path, files: dict[str, Path], out: Path
) -> dict[str, dict]:
    """{row: {"harm": run_eval summary, "win_rate": run_eval summary}} (win-rate against the base row)."""
    from polyalign.recipes.evaluate.config import EvalRunConfig, PromptSetConfig, SideConfig
    from polyalign.recipes.evaluate.run import run_eval

    e = cfg.eval
    results: dict[str, dict] = {}
    for row, path in files.items():
        results[row] = {}
        for metric in e.metrics:
            if metric == "win_rate" and row == BASE_ROW:
                continue
            judge = e.harm_judge if metric == "harm" else e.win_judge
            baseline = (
                SideConfig(completions=str(files[BASE_ROW]), label=BASE_ROW)
                if metric == "win_rate"
                else SideConfig()
            )
            run_cfg = EvalRunConfig(
                model=SideConfig(completions=str(path), label=row),
                baseline=baseline,
                prompts=PromptSetConfig(source=str(prompt_file), per_group=0),
                judge=judge,
                metrics=[metric],
                tie_policy=e.tie_policy,
                bootstrap_resamples=e.bootstrap_resamples,
                seed=cfg.seed,
                out_dir=str(path.parent / metric),
            )
            results[row][metric] = run_eval(run_cfg)
    return results


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Run every phase (module docstring); returns the summary written to out_dir/summary.json."""
    apply_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    general = load_pairs(cfg.general, "general", out)
    safety = load_pairs(cfg.safety, "safety", out)
    sets = build_train_sets(cfg, general, safety, out)
    models = {BASE_ROW: cfg.base_model, **train_rows(cfg, sets, out)}
    prompt_file, files = generate_all(cfg, models, out)
    results = evaluate_rows(cfg, prompt_file, files, out)
    languages = list(cfg.eval_languages)
    matrices = {
        metric: build_matrix({r: v[metric] for r, v in results.items() if metric in v}, metric, languages)
        for metric in cfg.eval.metrics
    }
    judges = sorted({s.get("judge", "") for v in results.values() for s in v.values()})
    notes = [
        f"starting model `{cfg.base_model}`; rows are <training set>/<method>; training sets: "
        + "; ".join(
            f"{n}: {v['report']['total']} pairs, languages {v['report']['by_language']}, safety share "
            f"{v['report']['safety_share']}"
            for n, v in sets.items()
        ),
        f"evaluation prompts: {cfg.eval.prompts}, {len(read_records(prompt_file))} prompts; judges: {judges}",
        *sorted({n for v in results.values() for s in v.values() for n in s.get("judge_notes", [])}),
    ]
    paths = write_experiment_report(matrices, languages, out, notes)
    summary = {
        "models": models,
        "train_sets": {n: v["report"] for n, v in sets.items()},
        "matrices": matrices,
        "report": paths,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def cli_experiment(config_path: str | None, overrides: list[str] = ()) -> int:
    """`polyalign experiment CONFIG [--a.b=c ...]`: run it and print where the report is."""
    try:
        cfg = load_experiment_config(config_path, list(overrides))
    except ConfigError as err:
        raise SystemExit(f"polyalign experiment: {err}") from None
    summary = run_experiment(cfg)
    print(
        f"polyalign experiment: {len(summary['models']) - 1} trained models; report: {summary['report']['md']}"
    )
    return 0
