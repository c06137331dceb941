"""Evaluation reports: `report.md` and `report.html` from the summary dict of `run.run_eval`, with per-language
bar plots (bars = point estimates, whiskers = bootstrap intervals) saved as PNG next to them.

The report is assembled once as a list of blocks (heading, paragraph, table, image) and rendered to both
formats, so the two never disagree. Every report prints the judge's `describe()` line and its notes (for the
lexicon judge: which languages it covers and that it is a crude proxy). Cells that were not measured are
written "-" (absent), never 0. Knows nothing about models or judges beyond the summary.
"""

from __future__ import annotations

import html
from pathlib import Path

from polyalign.files import atomic_write_text

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", file name, alt)


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "undefined"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _est(e: dict | None) -> str:
    if not e:
        return "-"
    return f"{_fmt(e['value'])} [{_fmt(e['low'])}, {_fmt(e['high'])}]"


def bar_plot(
    path: Path, series: dict[str, dict[str, dict]], title: str, ylabel: str, ref: float | None = None
) -> Path:
    """Grouped bars: one group per key (language), one bar per series name, whiskers = [low, high]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for points in series.values() for g in points}, key=lambda g: (g == "overall", g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(groups) * max(1, len(series)) + 2), 3.6))
    try:
        for k, (name, points) in enumerate(series.items()):
            xs = [i + k * width for i, g in enumerate(groups) if g in points]
            est = [points[g] for g in groups if g in points]
            values = [e["value"] for e in est]
            errs = [[v - e["low"] for v, e in zip(values, est)], [e["high"] - v for v, e in zip(values, est)]]
            ax.bar(xs, values, width, yerr=errs, capsize=3, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _rate_table(title: str, sides: dict[str, dict], key: str, reduction: dict | None) -> list[Block]:
    groups = sorted({g for s in sides.values() for g in s.get(key, {})})
    if not groups:
        return []
    header = ["group", *[f"{name} rate [CI]" for name in sides], *[f"{name} n" for name in sides]]
    header += ["relative reduction"] if reduction is not None else []
    rows = []
    for g in groups:
        row = [g, *[_est(s.get(key, {}).get(g)) for s in sides.values()]]
        row += [str(s.get(key, {}).get(g, {}).get("n", "-")) for s in sides.values()]
        if reduction is not None:
            row.append(_fmt(reduction[key][g]) if g in reduction.get(key, {}) else "-")
        rows.append(row)
    return [("h", 3, title), ("table", header, rows)]


def _harm_blocks(harm: dict, out_dir: Path) -> list[Block]:
    sides, reduction = harm["sides"], harm.get("relative_reduction")
    blocks: list[Block] = [("h", 2, "Harm rate (% of completions judged harmful)")]
    for name, s in sides.items():
        covered = ", ".join(f"{k}: {v}" for k, v in s["not_covered"].items()) or "none"
        blocks.append(
            (
                "p",
                f"{name}: overall {_est(s.get('overall'))} over {s['judged']} judged completions; "
                f"unparseable verdicts: {s['unparseable']}; not covered by the judge: {covered}.",
            )
        )
    if reduction is not None and "overall" in reduction:
        blocks.append(
            (
                "p",
                f"Relative harm reduction (baseline - model) / baseline, overall: "
                f"{_fmt(reduction['overall'])}.",
            )
        )
    for title, key in (
        ("By language", "by_language"),
        ("By global / local label", "by_label"),
        ("By harm category", "by_category"),
    ):
        blocks += _rate_table(title, sides, key, reduction)
    series = {name: s["by_language"] for name, s in sides.items() if s["by_language"]}
    if series:
        bar_plot(out_dir / "harm_by_language.png", series, "Harm rate by language", "harmful fraction")
        blocks.append(("img", "harm_by_language.png", "harm rate by language"))
    return blocks


def _win_blocks(win: dict, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [
        ("h", 2, "Win-rate against the baseline"),
        (
            "p",
            f"Tie policy: {win['tie_policy']}. Overall {_est(win.get('overall'))}; mean over languages "
            f"{_fmt(win.get('macro_mean'))}. Unparseable pairs: {win['unparseable']}; ties from order "
            f"disagreement: {win['disagreements']}.",
        ),
    ]
    rows = [
        [g, _est(e), str(e["win"]), str(e["loss"]), str(e["tie"]), str(e["n"])]
        for g, e in sorted(win["by_language"].items())
    ]
    if rows:
        blocks.append(("table", ["language", "win-rate [CI]", "wins", "losses", "ties", "n"], rows))
        points = dict(win["by_language"], **({"overall": win["overall"]} if win.get("overall") else {}))
        bar_plot(
            out_dir / "win_rate_by_language.png", {"model": points}, "Win-rate by language", "win-rate", 0.5
        )
        blocks.append(("img", "win_rate_by_language.png", "win-rate by language"))
    return blocks


def _exact_blocks(exact: dict, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Exact match (final integer)")]
    blocks += _rate_table("By language", exact, "by_language", None)
    blocks += [("p", f"{name}: overall {_est(s.get('overall'))}.") for name, s in exact.items()]
    series = {name: s["by_language"] for name, s in exact.items() if s["by_language"]}
    if series:
        bar_plot(out_dir / "exact_match_by_language.png", series, "Exact match by language", "accuracy")
        blocks.append(("img", "exact_match_by_language.png", "exact match by language"))
    return blocks


def report_blocks(summary: dict, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [
        ("h", 1, f"Evaluation: {summary['model']}"),
        (
            "p",
            f"Baseline: {summary.get('baseline') or 'none'}. Prompts: {summary['prompt_set']} "
            f"({summary['counts']['prompts']} evaluated; skipped as longer than the context: "
            f"{summary['counts']['skipped_too_long']}).",
        ),
        ("p", f"Judge: {summary['judge']}"),
    ]
    blocks += [("p", f"Judge note: {note}") for note in summary.get("judge_notes", [])]
    if "harm" in summary:
        blocks += _harm_blocks(summary["harm"], out_dir)
    if "win_rate" in summary:
        blocks += _win_blocks(summary["win_rate"], out_dir)
    if "exact_match" in summary:
        blocks += _exact_blocks(summary["exact_match"], out_dir)
    calls = summary.get("judge_calls")
    if calls:
        blocks.append(("p", "Judge requests: " + ", ".join(f"{k} {v}" for k, v in calls.items()) + "."))
    blocks.append(
        (
            "p",
            "Intervals: percentile bootstrap over prompts "
            f"({summary['bootstrap']['resamples']} resamples, {summary['bootstrap']['confidence']:.0%})."
            " '-' = not measured. Raw judgements: judgements.jsonl.",
        )
    )
    return blocks


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


def write_report(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and the plots into out_dir; returns {"md": path, "html": path}."""
    out_dir = Path(out_dir)
    blocks = report_blocks(summary, out_dir)
    md = atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    page = atomic_write_text(out_dir / "report.html", to_html(blocks, f"Evaluation: {summary['model']}"))
    return {"md": md, "html": page}
