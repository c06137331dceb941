"""Tests for polyalign.train.logging (metrics JSONL, resume truncation, progress) and polyalign.recipes.report."""

import json
import math
from contextlib import closing

import pytest
import torch

from polyalign.recipes.report import metric_series, plot_series, read_metrics, summarize, write_run_report
from polyalign.train.logging import (
    MetricsLogger,
    NullLogger,
    Progress,
    cut_logs,
    get_rank,
    is_main_process,
    print0,
)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_one_flushed_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    logger.log(1, {"reward": 0.5, "kl": float("nan"), "n": 3, "algo": "rloo"})
    # Flushed per line: readable before close.
    (record,) = _lines(tmp_path / "metrics.jsonl")
    assert record["step"] == 1 and record["reward"] == 0.5 and math.isnan(record["kl"])
    assert record["n"] == 3 and record["algo"] == "rloo" and isinstance(record["time"], float)
    logger.close()


def test_cut_logs_keeps_records_up_to_the_checkpoint_step(tmp_path):
    with closing(MetricsLogger(tmp_path, use_tensorboard=False)) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": float(step)})
            logger.log_samples(step, ["p"], [f"c{step}"], [float(step)])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # the torn last line of a killed run
    (tmp_path / "eval").mkdir()
    for step in (0, 2, 4):
        (tmp_path / "eval" / f"step_{step:06d}.json").write_text("{}")
    cut_logs(tmp_path, 3)
    with closing(MetricsLogger(tmp_path, use_tensorboard=False)) as logger:  # reopening appends
        logger.log(4, {"reward": 40.0})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _lines(tmp_path / "metrics.jsonl")[-1]["reward"] == 40.0
    assert [r["completion"] for r in _lines(tmp_path / "samples.jsonl")] == ["c1", "c2", "c3"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_000000.json", "step_000002.json"]
    cut_logs(tmp_path, -1)  # resuming without a checkpoint: start clean
    assert (tmp_path / "metrics.jsonl").read_text() == "" and not any((tmp_path / "eval").iterdir())


def test_log_samples_rows_and_length_check(tmp_path):
    with closing(MetricsLogger(tmp_path, use_tensorboard=False)) as logger:
        logger.log_samples(7, ["a", "a"], ["héllo", "x"], torch.tensor([1.0, -0.5]))
        with pytest.raises(ValueError, match="lengths differ"):
            logger.log_samples(7, ["a"], ["x", "y"], [1.0, 2.0])
    rows = _lines(tmp_path / "samples.jsonl")
    assert rows == [
        {"step": 7, "prompt": "a", "completion": "héllo", "reward": 1.0},
        {"step": 7, "prompt": "a", "completion": "x", "reward": -0.5},
    ]


def test_tensorboard_flag(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, use_tensorboard=True)
        MetricsLogger(tmp_path, use_tensorboard="auto").close()  # silently off
    else:
        with closing(MetricsLogger(tmp_path, use_tensorboard=True)) as logger:
            logger.log(1, {"reward": 1.0})
        assert any((tmp_path / "tensorboard").iterdir())


def test_null_logger_has_the_same_methods(tmp_path):
    logger = NullLogger()
    for name in ("log", "log_samples", "close"):
        assert callable(getattr(MetricsLogger, name)) and callable(getattr(logger, name))
    assert logger.log(1, {"r": torch.tensor(2.0)}) is None
    logger.log_samples(1, ["p"], ["c"], [1.0])
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_progress_disabled_is_silent_and_describes_metrics(capsys):
    with closing(Progress(total=10, enabled=False)) as progress:
        text = progress.update(1, {"reward": torch.tensor(0.51234), "kl": 0.03, "other": 9})
        assert text == "reward 0.5123 kl 0.03"
        text = progress.update(2, {"tokens_per_s": 1500.0})
        assert text.startswith("tok/s 1500 s/step ")
    assert capsys.readouterr().out == ""


def test_progress_print_every_fallback_and_print(capsys):
    with closing(Progress(total=4, enabled=False, print_every=2)) as progress:
        for step in range(1, 5):
            progress.update(step, {"reward": float(step)})
        progress.print("hello")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 2/4 reward 2") and out[1].startswith("step 4/4 reward 4")
    assert out[2] == "hello"


def test_progress_bar_only_on_a_tty(monkeypatch, capsys):
    with closing(Progress(total=3, enabled=True)) as progress:  # pytest's stdout is not a TTY
        assert not progress.enabled
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with closing(Progress(total=3, enabled=False)) as progress:
        assert not progress.enabled
    with closing(Progress(total=3)) as progress:
        assert progress.enabled
        progress.update(1, {"reward": 1.0})
        progress.print("message")
    out = capsys.readouterr().out
    assert "message" in out and "reward 1" in out


def test_rank_helpers(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert get_rank() == 1 and not is_main_process()
    print0("hidden")
    monkeypatch.setenv("RANK", "0")
    print0("shown")
    assert capsys.readouterr().out == "shown\n"


def _write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "rew'  # torn last line
    (run_dir / "metrics.jsonl").write_text(text)


def test_write_run_report_writes_pngs_table_and_notes(tmp_path):
    rows = [
        {"step": 1, "reward": 0.1, "kl": 0.0, "train/loss": 2.0},
        {"step": 2, "reward": 0.7, "kl": 0.2, "train/loss": 1.0},
        {"step": 3, "reward": 0.4, "kl": float("nan"), "train/loss": 1.5},
    ]
    _write_metrics(tmp_path, rows)
    report = write_run_report(
        tmp_path, "Tiny run", keys=("reward", "kl", "train/loss", "missing"), extra_markdown="## Notes\nok"
    )
    text = report.read_text()
    for png in ("reward.png", "kl.png", "train_loss.png"):
        path = tmp_path / "plots" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{png})" in text
    assert text.startswith("# Tiny run\n")
    assert "| reward | 0.1 | 0.4 | 0.7 (max) | 2 | 3 |" in text
    assert "| kl | 0 | 0.2 | 0 (min) | 1 | 2 |" in text  # the NaN is not a value
    assert "| train/loss | 2 | 1.5 | 1 (min) | 2 | 3 |" in text
    assert "Not logged in this run: `missing`." in text
    assert text.rstrip().endswith("## Notes\nok")


def test_read_metrics_and_series(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nope.jsonl")
    _write_metrics(
        tmp_path, [{"step": 1, "r": 1}, {"step": 2, "r": True}, {"step": 3, "r": "x"}, {"step": 4, "r": 2.5}]
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert metric_series(records, "r") == [(1, 1.0), (4, 2.5)]
    assert summarize([(1, 3.0), (2, 1.0), (3, 2.0)], lower_is_better=False)["best_step"] == 1
    assert summarize([(1, 3.0), (2, 1.0), (3, 2.0)], lower_is_better=True)["best"] == 1.0


def test_plot_series_multiple_lines_and_empty_error(tmp_path):
    path = plot_series(tmp_path / "p" / "two.png", {"a": [(1, 1.0), (2, 2.0)], "b": [(1, 0.5)]}, "t", "y")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_series(tmp_path / "empty.png", {"a": []}, "t", "y")
