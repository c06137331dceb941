"""The `polyalign` command: subcommands parse, overrides reach the config, bad input exits with a message."""

import json
import subprocess
import sys

import pytest

from polyalign.cli import build_parser, main


def test_train_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "configs/tiny-cpu/rloo.yaml",
                "--train.steps=1",
                "--eval.every=1",
                f"--output.run_dir={run_dir}",
                "--reward.functions={lexicon_sentiment: 1.0}",
            ]
        )
        == 0
    )
    assert (run_dir / "config.yaml").read_text().count("lexicon_sentiment") == 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1


def test_bad_override_exits_with_the_valid_keys(capsys):
    assert main(["train", "--train.learning_rate=0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("polyalign train: ") and "valid keys" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="unrecognised arguments"):
        main(["train", "--resume", "-x"])


def test_copg_bandit_command(tmp_path):
    assert main(["repro", "copg-bandit", "--epochs", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "regret.png").exists()


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "repro", "eval", "serve", "synth", "experiment", "plan"}
    out = subprocess.run([sys.executable, "-m", "polyalign.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
