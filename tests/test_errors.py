"""User errors end a command with one line naming the file, line and field; a traceback only with --debug."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from polyalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "configs" / "offline" / "dpo.yaml")


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as done:  # commands that validate their own config exit with their one line
        code, message = 1, str(done)
        return code, capsys.readouterr().err + message
    return code, capsys.readouterr().err


def test_a_bad_data_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    code, err = _run(capsys, "train", DPO, f"--data.train={bad}", f"--output.run_dir={tmp_path / 'run'}")
    assert code == 1
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith("polyalign train: ") and f"{bad}: line 2: malformed JSON" in err


def test_a_missing_file_and_a_bad_override_are_one_line(tmp_path, capsys):
    code, err = _run(capsys, "train", DPO, "--data.train=./nowhere/pairs", f"--output.run_dir={tmp_path}")
    assert code == 1 and "no such file: ./nowhere/pairs" in err and "Traceback" not in err
    code, err = _run(capsys, "train", "--train.lr=[1", f"--output.run_dir={tmp_path}")
    assert code == 1 and err.startswith("polyalign train: ") and "Traceback" not in err


def test_debug_prints_the_traceback(tmp_path, capsys):
    code, err = _run(
        capsys, "train", DPO, "--data.train=./nowhere.jsonl", f"--output.run_dir={tmp_path}", "--debug"
    )
    assert code == 1 and "Traceback" in err and err.strip().endswith("no such file: ./nowhere.jsonl")


def test_non_utf8_lines_are_named_then_skipped_under_on_error_skip(tmp_path, capsys):
    rows = [
        {"prompt": f"Tell me a story {i}", "chosen": "A happy dog.", "rejected": "A sad cat."}
        for i in range(12)
    ]
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    lines.insert(3, b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n')
    data = tmp_path / "pairs.jsonl.gz"
    data.write_bytes(gzip.compress(b"".join(lines)))
    common = [f"--data.train={data}", "--train.steps=1", "--train.batch_size=2", "--train.warmup_steps=0", "--eval.every=0",
              "--output.report=false", "--output.progress=false"]  # fmt: skip
    code, err = _run(capsys, "train", DPO, *common, f"--output.run_dir={tmp_path / 'a'}")
    assert code == 1 and f"{data}: line 4: not UTF-8" in err and "data.on_error=skip" in err
    code, err = _run(
        capsys, "train", DPO, *common, "--data.on_error=skip", f"--output.run_dir={tmp_path / 'b'}"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "data_report.json").read_text())
    assert report["train"]["skipped"] == {"bad_encoding": 1}, report  # counted in the data report
