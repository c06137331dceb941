"""The closing report of an online run: reward and KL per step (plots), held-out reward before and after, and
the stories (completions) of the starting and the final policy side by side."""

from __future__ import annotations

import json
from pathlib import Path

from polyalign.config import RunConfig
from polyalign.report import write_run_report


def _eval_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "eval").glob("step_*.json"))


def before_after(run_dir: Path, n: int = 3) -> tuple[dict | None, dict | None, list[tuple[str, str, str]]]:
    """First and last held-out evaluations, and n (prompt, before, after) completion triples."""
    files = _eval_files(Path(run_dir))
    if not files:
        return None, None, []
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    triples = [
        (a["prompt"], a["completion"], b["completion"]) for a, b in zip(first["samples"], last["samples"])
    ]
    return first, last, triples[:n]


def write_online_report(run_dir: str | Path, cfg: RunConfig) -> Path:
    run_dir = Path(run_dir)
    first, last, triples = before_after(run_dir)
    lines = [
        f"Algorithm `{cfg.algo.name}`, k = {cfg.rollout.samples_per_prompt}, beta = {cfg.algo.kl_coef}, "
        f"policy `{cfg.model.policy}`, rewards {dict(cfg.reward.functions)}.",
        "",
    ]
    if first and last:
        lines += ["| held-out (greedy) | start | end |", "|---|---|---|"]
        for key in ("eval/reward", "eval/kl", "eval/length"):
            lines.append(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
        lines += ["", "## Completions before and after", ""]
        for prompt, before, after in triples:
            lines += [
                f"**Prompt:** {prompt}",
                "",
                f"- before: {before.strip()}",
                f"- after: {after.strip()}",
                "",
            ]
    return write_run_report(
        run_dir,
        title=f"polyalign {cfg.algo.name} run",
        keys=("reward", "kl", "score", "length"),
        extra_markdown="\n".join(lines),
    )
