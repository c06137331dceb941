"""Run reports: plots of logged metrics and a markdown summary.

Reads a run's `metrics.jsonl` (written by `polyalign.train.logging.MetricsLogger`: one JSON object per
line with a "step" field), plots chosen keys against step with matplotlib's Agg backend (imported lazily, so
importing this module stays light), and writes `report.md` with the plots and a first/last/best table.
Knows nothing about trainers or algorithms.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

Series = list[tuple[int, float]]  # (step, value) pairs


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics JSONL file; a torn or unparseable line (a killed run's last write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: no metrics file at {path}")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def metric_series(records: Sequence[dict], key: str) -> Series:
    """(step, value) pairs for `key`, keeping finite numeric values only, in logged order."""
    series = []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            series.append((record["step"], float(value)))
    return series


def plot_series(
    path: str | os.PathLike, series: dict[str, Series], title: str = "", ylabel: str = ""
) -> Path:
    """Plot one line per named series (x = step) into a PNG at `path`; returns the path."""
    if not series or not any(series.values()):
        raise ValueError(f"plot_series: nothing to plot for {title or path!r} (all series empty)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        for name, points in series.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _lower_is_better(key: str) -> bool:
    """Keys named like a loss or a KL are minimised; everything else (reward, accuracy, ...) maximised."""
    last = re.split(r"[/.]", key)[-1].lower()
    return "loss" in last or last == "kl" or last.endswith("_kl") or last.startswith("kl_")


def summarize(series: Series, lower_is_better: bool) -> dict:
    """First, last and best value (with its step) of a non-empty series."""
    pick = min if lower_is_better else max
    best_step, best = pick(series, key=lambda point: point[1])
    return {
        "first": series[0][1],
        "last": series[-1][1],
        "best": best,
        "best_step": best_step,
        "n": len(series),
    }


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def _summary_row(key: str, series: Series) -> str:
    s = summarize(series, _lower_is_better(key))
    direction = "min" if _lower_is_better(key) else "max"
    return (
        f"| {key} | {s['first']:.6g} | {s['last']:.6g} | {s['best']:.6g} ({direction}) "
        f"| {s['best_step']} | {s['n']} |"
    )


def write_run_report(
    run_dir: str | os.PathLike,
    title: str,
    metrics_path: str | os.PathLike | None = None,
    keys: Sequence[str] = ("reward", "kl"),
    extra_markdown: str = "",
) -> Path:
    """Write `run_dir/report.md` with one PNG per key under `run_dir/plots/` and a summary table.

    "best" is the minimum for loss/KL-like keys (see `_lower_is_better`) and the maximum otherwise. Keys
    never logged are listed in the report rather than failing it. Returns the report path.
    """
    run_dir = Path(run_dir)
    records = read_metrics(metrics_path or run_dir / "metrics.jsonl")
    rows, figures, missing = [], [], []
    for key in keys:
        series = metric_series(records, key)
        if not series:
            missing.append(key)
            continue
        png = plot_series(run_dir / "plots" / f"{_file_stem(key)}.png", {key: series}, title=key, ylabel=key)
        figures.append(f"![{key}]({png.relative_to(run_dir).as_posix()})")
        rows.append(_summary_row(key, series))
    lines = [
        f"# {title}",
        "",
        f"{len(records)} metric records from `{Path(metrics_path or 'metrics.jsonl').name}`.",
    ]
    if rows:
        lines += [
            "",
            "| metric | first | last | best | best step | points |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    if missing:
        lines += ["", "Not logged in this run: " + ", ".join(f"`{k}`" for k in missing) + "."]
    lines += [""] + [line for fig in figures for line in (fig, "")]
    if extra_markdown:
        lines += [extra_markdown.rstrip(), ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
