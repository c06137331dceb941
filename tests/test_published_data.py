"""Data as published: Anthropic HH-RLHF is a `.jsonl.gz` of {chosen, rejected} dialogues; DPO reads it as is."""

from __future__ import annotations

import gzip
import json

from polyalign.cli import main


def _hh_file(path, n: int) -> None:
    rows = []
    for i in range(n):
        question = f"\n\nHuman: Tell me a story about a dog ({i}).\n\nAssistant:"
        rows.append(
            {
                "chosen": question + " The dog was happy and played.",
                "rejected": question + " The dog was sad.",
            }
        )
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _train(tmp_path, data, steps: int, *extra: str) -> dict:
    code = main(
        ["train", "offline/dpo", f"--data.train={data}", f"--train.steps={steps}", "--train.warmup_steps=0",
         "--data.eval_fraction=0.1", f"--output.run_dir={tmp_path / 'run'}", "--output.progress=false",
         "--output.report=false", *extra]
    )  # fmt: skip
    assert code == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_hh_jsonl_gz_trains_by_shipped_config_name(tmp_path):
    data = tmp_path / "train.jsonl.gz"
    _hh_file(data, 40)
    summary = _train(tmp_path, data, 1, "--eval.every=0")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["fmt"] == "hh" and summary["eval_start"]["eval/accuracy"] == 0.5  # ties count half


def test_hh_jsonl_gz_dpo_raises_held_out_accuracy(tmp_path):
    data = tmp_path / "train.jsonl.gz"
    _hh_file(data, 300)
    summary = _train(tmp_path, data, 40, "--eval.every=20")
    assert summary["best_eval"]["eval/accuracy"] > summary["eval_start"]["eval/accuracy"] + 0.3
