"""Experiment: matrix and report pieces (fast), config checks, training-set files, and the CPU-sized end to
end run on stories260K (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyalign.config import ConfigError, load_config
from polyalign.recipes.experiment.config import DataSource, ExperimentConfig, TrainSetConfig
from polyalign.recipes.experiment.report import build_matrix, matrix_markdown, write_experiment_report
from polyalign.recipes.experiment.run import build_train_sets, cli_experiment

ROOT = Path(__file__).resolve().parent.parent


def eval_summary(harm: dict[str, float], win: dict[str, float] | None = None) -> dict:
    """The parts of a run_eval summary the matrix reads."""
    out = {"harm": {"sides": {"model": {"by_language": {k: {"value": v} for k, v in harm.items()}}}}}
    if win is not None:
        out["win_rate"] = {"by_language": {k: {"value": v} for k, v in win.items()}}
    return out


def test_matrix_from_summaries_leaves_unmeasured_cells_empty():
    summaries = {
        "base": eval_summary({"en": 0.5, "fr": 0.25}),
        "en/dpo": eval_summary({"en": 0.1}, {"en": 0.75, "fr": 0.5}),
    }
    harm = build_matrix(summaries, "harm", ["en", "fr"])
    win = build_matrix({k: v for k, v in summaries.items() if "win_rate" in v}, "win_rate", ["en", "fr"])
    assert harm == {"base": {"en": 0.5, "fr": 0.25}, "en/dpo": {"en": 0.1, "fr": None}}
    assert win == {"en/dpo": {"en": 0.75, "fr": 0.5}}
    table = matrix_markdown(harm, ["en", "fr"], "harm")
    assert "| base | 50.0 | 25.0 | 37.5 |" in table  # mean over measured languages
    assert "| en/dpo | 10.0 | - | 10.0 |" in table  # unmeasured: "-", and left out of the mean


def test_report_files(tmp_path):
    matrices = {"harm": {"base": {"en": 0.5, "hi": None}}, "win_rate": {"x/dpo": {"en": 1.0, "hi": 0.0}}}
    paths = write_experiment_report(matrices, ["en", "hi"], tmp_path, ["a note"])
    text = Path(paths["md"]).read_text()
    assert "- a note" in text and "| x/dpo | 100.0 | 0.0 | 50.0 |" in text and "![harm](harm.png)" in text
    for metric in ("harm", "win_rate"):
        assert Path(paths[metric]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(paths["json"]).read_text())["matrices"] == matrices


def test_config_checks():
    ok = {"general": DataSource(pairs="x.jsonl")}
    with pytest.raises(ConfigError, match="unknown language code 'qq'"):
        ExperimentConfig(eval_languages=["qq"], **ok)
    with pytest.raises(ConfigError, match="needs safety data"):
        ExperimentConfig(train_sets=[TrainSetConfig(name="s", safety_share=0.15)], **ok)
    with pytest.raises(ConfigError, match="training.methods"):
        load_config(None, ["--general.pairs=x.jsonl", "--training.methods=[ppo]"], cls=ExperimentConfig)
    with pytest.raises(ConfigError, match="general: give synth or pairs"):
        ExperimentConfig()
    with pytest.raises(ConfigError, match="unique names"):
        ExperimentConfig(train_sets=[TrainSetConfig(name="a"), TrainSetConfig(name="a")], **ok)
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        load_config(path, cls=ExperimentConfig)


def test_train_set_files(tmp_path):
    general = [
        {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "language": "en" if i % 2 else "fr"}
        for i in range(20)
    ]
    safety = [
        {"prompt": f"s{i}", "chosen": "c", "rejected": "r", "language": "en", "global_or_local": "local"}
        for i in range(10)
    ]
    cfg = ExperimentConfig(
        general=DataSource(pairs="unused"),
        safety=DataSource(pairs="unused"),
        train_sets=[TrainSetConfig(name="en15", languages=["en"], safety_share=0.15, size=10)],
    )
    sets = build_train_sets(cfg, general, safety, tmp_path)
    report = sets["en15"]["report"]
    assert (report["general"], report["safety"], report["safety_share"]) == (8, 2, 0.2)
    rows = [json.loads(x) for x in Path(sets["en15"]["path"]).read_text().splitlines()]
    assert len(rows) == 10 and {r["language"] for r in rows} == {"en"}
    prompts = Path(sets["en15"]["prompts"]).read_text().splitlines()
    assert len(prompts) == 10


@pytest.mark.slow
def test_transfer_experiment_end_to_end_on_stories260k(tmp_path, capsys, monkeypatch):
    """The CPU-sized experiment: synth (stories260K + sentiment RM) -> DPO on en and on en+fr+es -> harm
    (lexicon) and win-rate (sentiment RM) on four languages -> matrix report. About 30 s on a free CPU. Run
    from another folder: the paths in the config are relative to it."""
    monkeypatch.chdir(tmp_path)
    code = cli_experiment(str(ROOT / "configs/experiment/transfer-tiny.yaml"), [f"--out_dir={tmp_path}"])
    assert code == 0 and "2 trained models" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "en/dpo", "en-fr-es/dpo"]
    harm, win = summary["matrices"]["harm"], summary["matrices"]["win_rate"]
    assert set(harm) == {"base", "en/dpo", "en-fr-es/dpo"} and set(win) == {"en/dpo", "en-fr-es/dpo"}
    for row in win.values():
        assert set(row) == {"en", "fr", "es", "de"} and all(0 <= v <= 1 for v in row.values())
    assert summary["train_sets"]["en"]["by_language"].keys() == {"en"}
    assert (tmp_path / "harm.png").is_file() and (tmp_path / "win_rate.png").is_file()
    assert "| en/dpo |" in (tmp_path / "report.md").read_text()
    # a rerun reuses the synth records and the trained models
    cli_experiment(str(ROOT / "configs/experiment/transfer-tiny.yaml"), [f"--out_dir={tmp_path}"])
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["matrices"] == summary["matrices"]
