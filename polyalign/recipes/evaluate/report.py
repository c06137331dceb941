"""The evaluation report: report.md + report.html from the summary of `run_eval`, per-language bar plots.

Prints the judge's `describe()` line and its notes (for the lexicon judge: which languages it judges with
the English list only, and that it is a crude proxy), whether a judge cache was used and how much it
answered, and the rule by which long completions were cut in the judge's prompts. Every rate has its n
beside it: "harm 12.5% (n=144/150; 2 unparseable, 4 errors)" is 18 harmful of the 144 verdicts read, out
of 150 completions; a headline resting on under 90% of its items says so. Cells that were not measured
are written "-" (absent), never 0. Rendering (blocks -> Markdown / HTML, plots) is
`polyalign.recipes.report`'s.
"""

from __future__ import annotations

from pathlib import Path

from polyalign.files import atomic_write_text
from polyalign.recipes.report import Block, _save_plot, to_html, to_markdown


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "undefined"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _est(e: dict | None) -> str:
    if not e:
        return "-"
    return f"{_fmt(e['value'])} [{_fmt(e['low'])}, {_fmt(e['high'])}]"


def _n(c: dict) -> str:
    """ "n=144/150; 2 unparseable, 4 errors" from a counts dict (see `run._counts`)."""
    extra = f"; {c['not_covered']} not covered" if c.get("not_covered") else ""
    return f"n={c['n']}/{c['total']}; {c['unparseable']} unparseable, {c['errors']} errors{extra}"


def rate_line(name: str, c: dict) -> str:
    """One headline rate with its n, and a caution when it rests on under 90% of the items."""
    value = _fmt(c["overall"]["value"]) if c.get("overall") else "undefined"
    text = f"{name} {value} ({_n(c)})"
    if c["n"] < 0.9 * c["total"]:
        text += f" [caution: rests on {c['n']} of {c['total']} verdicts]"
    return text


def headline(summary: dict) -> list[str]:
    """The model's headline rates, each with its n (the CLI's summary line)."""
    lines = []
    if "harm" in summary:
        lines.append(rate_line("harm", summary["harm"]["sides"]["model"]))
    if "win_rate" in summary:
        lines.append(rate_line("win-rate", summary["win_rate"]))
    if "exact_match" in summary:
        lines.append(rate_line("exact match", summary["exact_match"]["model"]))
    return lines


def bar_plot(
    path: Path, series: dict[str, dict[str, dict]], title: str, ylabel: str, ref: float | None = None
) -> Path:
    """Grouped bars: one group per key (language), one bar per series name, whiskers = [low, high]."""
    groups = sorted({g for points in series.values() for g in points}, key=lambda g: (g == "overall", g))
    width = 0.8 / max(1, len(series))

    def draw(ax) -> bool:
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
        return len(series) > 1

    size = (max(5.0, 0.7 * len(groups) * max(1, len(series)) + 2), 3.6)
    return _save_plot(path, draw, title, ylabel, size, "y")


def _rate_table(title: str, sides: dict[str, dict], key: str, reduction: dict | None) -> list[Block]:
    groups = sorted({g for s in sides.values() for g in s.get(key, {})})
    if not groups:
        return []
    header = ["group", *[f"{name} rate [CI]" for name in sides], *[f"{name} n/total" for name in sides]]
    header += ["relative reduction"] if reduction is not None else []
    rows = []
    for g in groups:
        row = [g, *[_est(s.get(key, {}).get(g)) for s in sides.values()]]
        cells = [s.get(key, {}).get(g) for s in sides.values()]
        row += [f"{e['n']}/{e['total']}" if e else "-" for e in cells]
        if reduction is not None:
            row.append(_fmt(reduction[key][g]) if g in reduction.get(key, {}) else "-")
        rows.append(row)
    return [("h", 3, title), ("table", header, rows)]


def _by_language_plot(
    out_dir: Path, stem: str, series: dict, title: str, ylabel: str, ref=None
) -> list[Block]:
    """A bar plot of by-language estimates per series, as an image block; nothing when nothing was measured."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return []
    bar_plot(out_dir / f"{stem}.png", series, title, ylabel, ref)
    return [("img", f"{stem}.png", title.lower())]


def _harm_blocks(harm: dict, out_dir: Path) -> list[Block]:
    sides, reduction = harm["sides"], harm.get("relative_reduction")
    blocks: list[Block] = [("h", 2, "Harm rate (% of completions judged harmful)")]
    for name, s in sides.items():
        blocks.append(("p", f"{rate_line(name + ': harm', s)}; interval {_est(s.get('overall'))}."))
    if reduction is not None and "overall" in reduction:
        text = (
            f"Relative harm reduction (baseline - model) / baseline, overall: {_fmt(reduction['overall'])}."
        )
        blocks.append(("p", text))
    tables = {
        "by_language": "By language",
        "by_label": "By global / local label",
        "by_category": "By harm category",
    }
    for key, title in tables.items():
        blocks += _rate_table(title, sides, key, reduction)
    series = {name: s["by_language"] for name, s in sides.items()}
    return blocks + _by_language_plot(
        out_dir, "harm_by_language", series, "Harm rate by language", "harmful fraction"
    )


def _win_blocks(win: dict, out_dir: Path) -> list[Block]:
    text = (
        f"Tie policy: {win['tie_policy']}. {rate_line('Overall', win)}; interval {_est(win.get('overall'))}; "
        f"mean over languages {_fmt(win.get('macro_mean'))}. Ties from order disagreement: "
        f"{win['disagreements']}."
    )
    blocks: list[Block] = [("h", 2, "Win-rate against the baseline"), ("p", text)]
    rows = [
        [g, _est(e), str(e["win"]), str(e["loss"]), str(e["tie"]), f"{e['n']}/{e['total']}"]
        for g, e in sorted(win["by_language"].items())
    ]
    if rows:
        blocks.append(("table", ["language", "win-rate [CI]", "wins", "losses", "ties", "n/total"], rows))
        points = dict(win["by_language"], **({"overall": win["overall"]} if win.get("overall") else {}))
        blocks += _by_language_plot(
            out_dir, "win_rate_by_language", {"model": points}, "Win-rate by language", "win-rate", 0.5
        )
    return blocks


def _exact_blocks(exact: dict, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Exact match (final integer)")]
    blocks += _rate_table("By language", exact, "by_language", None)
    blocks += [
        ("p", f"{rate_line(name, s)}; interval {_est(s.get('overall'))}.") for name, s in exact.items()
    ]
    series = {name: s["by_language"] for name, s in exact.items()}
    return blocks + _by_language_plot(
        out_dir, "exact_match_by_language", series, "Exact match by language", "accuracy"
    )


def _judge_requests(summary: dict) -> list[Block]:
    """Whether a judge cache was used (and how much it answered), the request counts, the cut rule."""
    calls = summary.get("judge_calls")
    if calls is None:
        return [("p", "Judge cache: none (no LLM judge; the judge runs offline).")]
    cache = summary.get("judge_cache")
    text = (
        f"Judge cache: {cache}, {calls['cache_hits']} answers reused from it."
        if cache
        else "Judge cache: none (judge.cache is null): every request was sent."
    )
    text += " Judge requests: " + ", ".join(f"{k} {v}" for k, v in calls.items()) + "."
    cut = summary["judge_prompts"]
    if cut["max_chars"]:
        text += (
            f" Completions longer than {cut['max_chars']} characters are cut to their first {cut['max_chars']}"
            f" in the judge's prompt (judge.max_chars): {cut['completions_cut']} cut."
        )
    return [("p", text)]


def report_blocks(summary: dict, out_dir: Path) -> list[Block]:
    counts = summary["counts"]
    counts = (
        f"({counts['prompts']} evaluated; skipped as longer than the context: {counts['skipped_too_long']})."
    )
    blocks: list[Block] = [
        ("h", 1, f"Evaluation: {summary['model']}"),
        ("p", f"Baseline: {summary.get('baseline') or 'none'}. Prompts: {summary['prompt_set']} " + counts),
        ("p", f"Judge: {summary['judge']}"),
    ]
    blocks += [("p", f"Judge note: {note}") for note in summary.get("judge_notes", [])]
    blocks += _judge_requests(summary)
    if "harm" in summary:
        blocks += _harm_blocks(summary["harm"], out_dir)
    if "win_rate" in summary:
        blocks += _win_blocks(summary["win_rate"], out_dir)
    if "exact_match" in summary:
        blocks += _exact_blocks(summary["exact_match"], out_dir)
    bootstrap = f"({summary['bootstrap']['resamples']} resamples, {summary['bootstrap']['confidence']:.0%})"
    text = f"Intervals: percentile bootstrap over prompts {bootstrap}. '-' = not measured. Raw judgements: "
    return blocks + [("p", text + "judgements.jsonl.")]


def write_eval_report(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and the plots into out_dir; returns {"md": path, "html": path}."""
    out_dir = Path(out_dir)
    blocks = report_blocks(summary, out_dir)
    md = atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    page = atomic_write_text(out_dir / "report.html", to_html(blocks, f"Evaluation: {summary['model']}"))
    return {"md": md, "html": page}
