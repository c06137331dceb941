"""The experiment's matrix report: one row per trained model (training set x method, plus the starting
model), one column per evaluation language, one matrix per metric (harm rate, win-rate against the starting
model). Written as `matrix.json`, `report.md` (Markdown tables, values in percent, "-" where a value was not
measured: a language the judge does not cover, or win-rate of the starting model against itself) and one PNG
heatmap per metric. A cell is never filled with a made-up number.
"""

from __future__ import annotations

import json
from pathlib import Path

METRIC_TITLES = {
    "harm": "harm rate (% harmful, lower is better)",
    "win_rate": "win-rate vs the starting model (%)",
}

Matrix = dict[str, dict[str, float | None]]  # row -> language -> value in [0, 1] or None


def cell(summary: dict, metric: str, language: str) -> float | None:
    """One matrix value from a `run_eval` summary: the model side's harm rate or the win-rate, per language."""
    if metric == "harm":
        groups = summary.get("harm", {}).get("sides", {}).get("model", {}).get("by_language", {})
    else:
        groups = summary.get("win_rate", {}).get("by_language", {})
    entry = groups.get(language)
    return None if entry is None else float(entry["value"])


def build_matrix(summaries: dict[str, dict], metric: str, languages: list[str]) -> Matrix:
    """{row: {language: value}} from {row: eval summary}, rows in the given order."""
    return {row: {lang: cell(s, metric, lang) for lang in languages} for row, s in summaries.items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def matrix_markdown(matrix: Matrix, languages: list[str], title: str) -> str:
    """A Markdown table: rows x languages, plus the mean over the measured languages of each row."""
    lines = [f"### {title}", "", "| model | " + " | ".join(languages) + " | mean |"]
    lines.append("|---|" + "---:|" * (len(languages) + 1))
    for row, values in matrix.items():
        measured = [values[lang] for lang in languages if values.get(lang) is not None]
        mean = sum(measured) / len(measured) if measured else None
        lines.append(
            f"| {row} | " + " | ".join(_fmt(values.get(lang)) for lang in languages) + f" | {_fmt(mean)} |"
        )
    return "\n".join(lines)


def plot_heatmap(matrix: Matrix, languages: list[str], path: Path, title: str) -> Path:
    """A heatmap PNG of the matrix in percent; unmeasured cells are blank and labelled "-"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(matrix)
    data = np.array(
        [[np.nan if matrix[r][lang] is None else 100 * matrix[r][lang] for lang in languages] for r in rows]
    )
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(languages), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(languages)):
            text = "-" if np.isnan(data[i, j]) else f"{data[i, j]:.0f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if data[i, j] < 60 else "black")
    ax.set_xlabel("evaluation language")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_experiment_report(
    matrices: dict[str, Matrix], languages: list[str], out_dir: str | Path, notes: list[str] = ()
) -> dict[str, str]:
    """matrix.json, report.md and <metric>.png under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "matrix.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps({"languages": languages, "matrices": matrices}, indent=2))
    parts = ["# polyalign experiment: training set x evaluation language", ""]
    parts += [f"- {note}" for note in notes] + [""]
    for metric, matrix in matrices.items():
        title = METRIC_TITLES.get(metric, metric)
        png = plot_heatmap(matrix, languages, out / f"{metric}.png", title)
        paths[metric] = png
        parts += [matrix_markdown(matrix, languages, title), "", f"![{metric}]({png.name})", ""]
    paths["md"].write_text("\n".join(parts))
    return {k: str(v) for k, v in paths.items()}
