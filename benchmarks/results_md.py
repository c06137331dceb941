"""RESULTS.md keeps one table per machine: `update(text, machine, row)` puts a run.py summary row into the
table of the machine it ran on (a new section when the machine is new; the row of the same workload and
size is replaced). Pure text in, text out; run.py reads and writes the file.

A machine section starts with the marker line `<!-- machine: CPU MODEL | N cores -->` and ends at the next
heading of level 1 or 2; new sections go after the `<!-- machine tables -->` marker.
"""

from __future__ import annotations

ANCHOR = "<!-- machine tables -->"
HEADER = (
    "| workload | size | pairs | TRL s/step (runs) | polyalign s/step (runs) | TRL/polyalign per pair | "
    "median ratio | load before -> after, each run | matmul GFLOP/s, memcpy GB/s | date |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def machine_key(machine: dict) -> str:
    return f"{machine['cpu']} | {machine['cores']} cores"


def row(summary: dict, machine: dict, date: str) -> str:
    """One table row from run.py's `summarize` output (both libraries present)."""
    trl, pa = summary["trl"], summary["polyalign"]
    runs = lambda side: ", ".join(f"{x:.3f}" for x in side["runs_s_per_step"])
    loads = "; ".join(f"{a}->{b}" for a, b in summary["loads"])
    cells = [
        summary["workload"], summary["size"], str(len(summary["pair_ratios"])),
        f"{trl['median_s_per_step']:.3f} ({runs(trl)})", f"{pa['median_s_per_step']:.3f} ({runs(pa)})",
        ", ".join(f"{r:.2f}" for r in summary["pair_ratios"]), f"**{summary['median_ratio']:.2f}x**",
        loads, f"{machine['matmul_2048_gflops']}, {machine['memcpy_gb_s']}", date,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def update(text: str, machine: dict, new_row: str, versions: str = "") -> str:
    """`text` with `new_row` in the table of `machine` (replacing the row of the same workload and size)."""
    if ANCHOR not in text:
        raise ValueError(f"RESULTS.md has no {ANCHOR!r} line: add it where the machine tables go")
    marker = f"<!-- machine: {machine_key(machine)} -->"
    lines = text.split("\n")
    if marker not in lines:
        at = lines.index(ANCHOR) + 1
        title = f"## {machine['cpu']}, {machine['cores']} cores"
        lines[at:at] = ["", marker, title, "", *([versions, ""] if versions else []), *HEADER.split("\n")]
    start = lines.index(marker)
    end = next((i for i in range(start + 2, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    key = new_row.split("|")[1:3]
    same = [i for i in range(start, end) if lines[i].startswith("| ") and lines[i].split("|")[1:3] == key]
    if same:
        lines[same[0]] = new_row
    else:
        last = max(i for i in range(start, end) if lines[i].startswith("|"))
        lines.insert(last + 1, new_row)
    return "\n".join(lines)
