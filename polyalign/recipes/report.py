"""Reports, written after the work is done (`polyalign train` writes one when output.report is on): a training
run's (plots of its logged metrics, a first/last/best table, held-out results, the online run's completions
before and after), and the rendering that the evaluation report (`polyalign.recipes.evaluate.report`) shares.

A report is assembled once as a list of blocks (heading, paragraph, table, image) and rendered by `to_markdown`
(and `to_html`), so two formats never disagree. Plots are PNGs written with matplotlib's Agg backend, imported
lazily so importing this module stays light.

Training runs: `write_run_report` reads `metrics.jsonl` (written by `polyalign.train.logging.MetricsLogger`:
one JSON object per line with a "step" field) and plots chosen keys against step.
Knows nothing about trainers, algorithms, models or judges beyond the metrics file and the summary (and, for the
reward-hacking monitors it reports, their thresholds: `polyalign.train.monitors.alarms`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from polyalign.files import atomic_write_text

Series = list[tuple[int, float]]  # (step, value) pairs
Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", file name, alt)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if block[0] == "h":
            out.append("#" * block[1] + " " + block[2])
        elif block[0] == "p":
            out.append(block[1])
        elif block[0] == "table":
            header, rows = block[1], block[2]
            out.append("\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]))
        else:
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body = []
    for block in blocks:
        if block[0] == "h":
            body.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif block[0] == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(f'<p><img src="{e(block[1])}" alt="{e(block[2])}"></p>')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{style}'
        f"</style></head><body>{''.join(body)}</body></html>\n"
    )


def _save_plot(
    path: str | os.PathLike, draw: Callable, title: str, ylabel: str, size: tuple, grid: str
) -> Path:
    """A PNG at `path` of what `draw(ax)` plots, with title, y label, a light `grid` ("both" | "y") and a
    legend when `draw` returns True."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        legend = draw(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis=grid, alpha=0.3)
        if legend:
            ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


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

    def draw(ax) -> bool:
        for name, points in series.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        return len(series) > 1

    return _save_plot(path, draw, title, ylabel, (6, 3.5), "both")


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


def _summary_row(key: str, series: Series) -> list[str]:
    s = summarize(series, _lower_is_better(key))
    direction = "min" if _lower_is_better(key) else "max"
    values = (f"{s['first']:.6g}", f"{s['last']:.6g}", f"{s['best']:.6g} ({direction})")
    return [key, *values, str(s["best_step"]), str(s["n"])]


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
        figures.append(("img", png.relative_to(run_dir).as_posix(), key))
        rows.append(_summary_row(key, series))
    source = Path(metrics_path or "metrics.jsonl").name
    blocks: list[Block] = [("h", 1, title), ("p", f"{len(records)} metric records from `{source}`.")]
    if rows:
        blocks.append(("table", ["metric", "first", "last", "best", "best step", "points"], rows))
    if missing:
        blocks.append(("p", "Not logged in this run: " + ", ".join(f"`{k}`" for k in missing) + "."))
    blocks += figures + ([("p", extra_markdown.rstrip())] if extra_markdown else [])
    return atomic_write_text(run_dir / "report.md", to_markdown(blocks))


# ---------------------------------------------------------------- training runs


def before_after(run_dir: Path, n: int = 3) -> tuple[dict | None, dict | None, list[tuple[str, str, str]]]:
    """First and last held-out evaluations of an online run, and n (prompt, before, after) triples."""
    files = sorted((Path(run_dir) / "eval").glob("step_*.json"))
    if not files:
        return None, None, []
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    triples = [
        (a["prompt"], a["completion"], b["completion"]) for a, b in zip(first["samples"], last["samples"])
    ]
    return first, last, triples[:n]


def _online_text(run_dir: Path, cfg) -> str:
    first, last, triples = before_after(run_dir)
    lines = [
        f"Algorithm `{cfg.algo.name}`, k = {cfg.rollout.samples_per_prompt}, beta = {cfg.algo.kl_coef}, "
        f"policy `{cfg.model.policy}`, rewards {dict(cfg.reward.functions)}.",
        "",
    ]
    if first and last:
        lines += ["| held-out (greedy) | start | end |", "|---|---|---|"]
        lines += [
            f"| {k} | {first[k]:.4f} | {last[k]:.4f} |" for k in ("eval/reward", "eval/kl", "eval/length")
        ]
        lines += ["", "## Completions before and after", ""]
        for prompt, before, after in triples:
            lines += [
                f"**Prompt:** {prompt}",
                "",
                f"- before: {before.strip()}",
                f"- after: {after.strip()}",
                "",
            ]
    return "\n".join(lines)


def _offline_text(summary: dict, cfg) -> str:
    rows = [
        ("start", summary.get("eval_start")),
        ("best", summary.get("best_eval")),
        ("final", summary.get("eval_final")),
    ]
    keys = sorted({k for _, r in rows if r for k in r if k.startswith("eval/")})
    table = ""
    if keys:
        lines = [
            "| held-out | " + " | ".join(name for name, _ in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for key in keys:
            lines.append(
                f"| {key} | " + " | ".join(f"{r[key]:.4f}" if r and key in r else "" for _, r in rows) + " |"
            )
        best = summary.get("best_eval")
        table = "\n".join(lines) + (f"\n\nBest checkpoint: step {best['step']}." if best else "")
    return (
        f"Loss `{cfg.loss.name}` (beta {cfg.loss.beta}), model `{cfg.model.policy}`, data `{cfg.data.train}`, "
        f"{summary.get('steps')} steps of {cfg.train.batch_size} pairs.\n\n{table}\n\n"
        f"Data: `{json.dumps(summary.get('data'), ensure_ascii=False)}`\n"
    )


def plot_reward_vs_kl(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """The reward-KL frontier: each step's training score (before the KL term) against its KL, coloured by
    step, with the held-out evaluations (eval/reward vs eval/kl) marked."""
    points = [(r["step"], r["kl"], r["score"]) for r in records if {"kl", "score"} <= r.keys()]
    evals = [
        (r["eval/kl"], r["eval/reward"], r["step"]) for r in records if {"eval/kl", "eval/reward"} <= r.keys()
    ]
    if not points:
        raise ValueError(f"plot_reward_vs_kl: no step logs both kl and score ({path})")

    def draw(ax) -> bool:
        steps, kl, score = zip(*points)
        dots = ax.scatter(kl, score, c=steps, s=8, cmap="viridis", label="training step")
        ax.figure.colorbar(dots, ax=ax, label="step")
        for x, y, step in evals:
            ax.scatter([x], [y], marker="*", s=120, color="red", edgecolors="black")
            ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.scatter([], [], marker="*", s=120, color="red", label="held-out eval (step)")
        ax.set_xlabel("KL to the reference (nats per completion)")
        return True

    return _save_plot(path, draw, "reward vs KL", "score", (6, 4), "both")


MONITOR_KEYS = (
    "monitor/length_drift", "monitor/held_out_distinct", "monitor/distinct_2", "monitor/repeat_4gram",
    "monitor/unfinished", "monitor/kl_per_token", "monitor/scorer_corr",
)  # fmt: skip


def fired_monitors(records: Sequence[dict]) -> list[list[str]]:
    """Rows (monitor, first step, last step, steps fired, the first warning) of the monitors that crossed
    their thresholds (`polyalign.train.monitors.alarms`) at some logged step."""
    from polyalign.train.monitors import alarms

    fired: dict[str, tuple[list[int], str]] = {}
    for record in records:
        for text in alarms(record):
            steps = fired.setdefault(text.split()[1], ([], text))[0]
            steps += [] if steps and steps[-1] == record["step"] else [record["step"]]
    return [[name, str(s[0]), str(s[-1]), str(len(s)), f"`{text}`"] for name, (s, text) in fired.items()]


def _monitor_text(run_dir: Path, records: list[dict]) -> str:
    """The online report's "Monitors" section: which reward-hacking monitors fired and when, and plots of the
    monitors, of held-out evaluations over the training reward, and of reward against KL (docs/monitors.md)."""
    plots, lines = run_dir / "plots", ["## Monitors", ""]
    fired = fired_monitors(records)
    if fired:
        lines += ["| monitor | first step | last step | steps | first warning |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in fired] + [""]
    else:
        lines += ["No monitor crossed its threshold (docs/monitors.md).", ""]
    names = {
        "score": "training score",
        "eval/reward": "held-out reward",
        "eval/scorer": "held-out eval.scorer",
    }
    curves = {name: metric_series(records, key) for key, name in names.items()}
    if curves["training score"]:
        plot_series(plots / "held_out_over_training.png", curves, "held-out evals over the training score")
        lines += ["![held-out evaluations over training](plots/held_out_over_training.png)", ""]
        plot_reward_vs_kl(plots / "reward_vs_kl.png", records)
        lines += ["![reward vs KL](plots/reward_vs_kl.png)", ""]
    monitors = {k.removeprefix("monitor/"): metric_series(records, k) for k in MONITOR_KEYS}
    if any(monitors.values()):
        plot_series(plots / "monitors.png", monitors, "reward-hacking monitors", "ratio / fraction / nats")
        lines.append("![monitors](plots/monitors.png)")
    return "\n".join(lines) + "\n"


def write_training_report(summary: dict, cfg) -> Path:
    """run_dir/report.md (and plots) for the summary that `train_online` / `train_offline` returned."""
    run_dir = Path(summary["run_dir"])
    if hasattr(cfg, "loss"):  # an offline run
        keys = ("loss", "accuracy", "eval/loss", "eval/accuracy", "grad_norm")
        title, text = f"polyalign offline {cfg.loss.name} run", _offline_text(summary, cfg)
    else:
        keys, title = ("reward", "kl", "score", "length"), f"polyalign {cfg.algo.name} run"
        text = (
            _online_text(run_dir, cfg)
            + "\n\n"
            + _monitor_text(run_dir, read_metrics(run_dir / "metrics.jsonl"))
        )
    return write_run_report(run_dir, title=title, keys=keys, extra_markdown=text)
