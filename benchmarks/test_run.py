"""run.py's pair arithmetic and RESULTS.md's one-table-per-machine update, and coload.py's step parsing
(hand-made results; no timing). Run: python -m pytest benchmarks/test_run.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import coload  # noqa: E402
import results_md  # noqa: E402
import run  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cores": 2, "matmul_2048_gflops": 300.0, "memcpy_gb_s": 9.5}


def result(lib: str, round_: int, s: float, load=(1.0, 1.5)) -> dict:
    return {
        "lib": lib, "round": round_, "median_s_per_step": s, "gen_tokens_per_s": 1024 / s, "peak_rss_mib": 600,
        "breakdown_s": {"generate": s / 2}, "versions": {"torch": "2.13"}, "load_before": load[0], "load": load[1],
    }  # fmt: skip


def test_pair_ratios_and_their_median():
    runs = [
        result("trl", 0, 1.2),
        result("polyalign", 0, 0.4),
        result("trl", 1, 0.9),
        result("polyalign", 1, 0.3),
    ]
    runs += [result("trl", 2, 3.0), result("polyalign", 2, 0.5)]  # a pair under load: its own ratio
    summary = run.summarize(runs)
    assert summary["pair_ratios"] == [3.0, 3.0, 6.0]
    assert summary["median_ratio"] == 3.0
    assert summary["trl"]["median_s_per_step"] == 1.2 and summary["polyalign"]["median_s_per_step"] == 0.4
    assert summary["loads"] == [(1.0, 1.5)] * 6
    assert "pair_ratios" not in run.summarize([r for r in runs if r["lib"] == "trl"])


def test_results_md_one_table_per_machine_and_rows_replaced():
    runs = [result("trl", i, 1.0 + i / 10) for i in range(3)] + [
        result("polyalign", i, 0.5) for i in range(3)
    ]
    summary = {"workload": "rloo", "size": "tiny", **run.summarize(runs)}
    row = results_md.row(summary, MACHINE, "2026-01-01")
    assert "| rloo | tiny | 3 | 1.100 (1.000, 1.100, 1.200) | 0.500 (0.500, 0.500, 0.500) |" in row
    assert "2.00, 2.20, 2.40 | **2.20x** |" in row and "| 300.0, 9.5 |" in row
    text = f"# R\n\n{results_md.ANCHOR}\n\n# Earlier\n\nold text\n"
    once = results_md.update(text, MACHINE, row, "torch 2.13")
    assert once.count("<!-- machine: Test CPU | 2 cores -->") == 1 and once.count("| rloo | tiny |") == 1
    dpo = row.replace("| rloo |", "| dpo |").replace("2.20x", "1.40x")
    twice = results_md.update(results_md.update(once, MACHINE, dpo), MACHINE, row.replace("2.20x", "2.50x"))
    assert twice.count("| rloo | tiny |") == 1 and "2.50x" in twice and "2.20x" not in twice
    assert twice.index("| dpo |") < twice.index("# Earlier")
    other = results_md.update(twice, {**MACHINE, "cpu": "Other CPU"}, row)
    assert other.count("| rloo | tiny |") == 2 and other.count("<!-- machine:") == 2
    with pytest.raises(ValueError, match="machine tables"):
        results_md.update("# R\n", MACHINE, row)


def test_coload_step_times_of_a_finished_and_a_stopped_run():
    lines = [
        {"built": 100.0, "threads": 2},
        {"step": 0, "s": 2.0, "end": 102.0},
        {"step": 1, "s": 1.0, "end": 103.0},
    ]
    stdout = "benchmark model tiny\n" + "\n".join(json.dumps(x) for x in lines)
    assert coload.step_times(stdout, None) == ([2.0, 1.0], False)
    assert coload.step_times(stdout, 110.0) == ([2.0, 1.0, 7.0], True)  # the unfinished step: >= 7 s
    assert coload.step_times("", 110.0) == ([], True)
    assert coload.step_times(stdout + '\n{"done": 104.0}', 110.0) == (
        [2.0, 1.0],
        False,
    )  # stopped on its way out


def test_record_writes_the_row_into_the_machine_table(tmp_path):
    runs = [result("trl", i, 1.0) for i in range(3)] + [result("polyalign", i, 0.5) for i in range(3)]
    summary = {"workload": "dpo", "size": "small", **run.summarize(runs)}
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# R\n\n{results_md.ANCHOR}\n")
    run.record(summary, {**MACHINE, "omp_env": "OMP_WAIT_POLICY=PASSIVE"}, path)
    text = path.read_text()
    assert "## Test CPU, 2 cores" in text and "torch 2.13; OpenMP env OMP_WAIT_POLICY=PASSIVE" in text
    assert "| dpo | small | 3 | 1.000 (1.000, 1.000, 1.000) | 0.500 (0.500, 0.500, 0.500) |" in text
