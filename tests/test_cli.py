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
    assert set(sub.choices) == {"train", "configs", "repro", "eval", "serve", "synth", "experiment", "plan"}
    out = subprocess.run([sys.executable, "-m", "polyalign.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_configs_lists_the_shipped_configs_and_print_config_every_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # shipped configs are found from any folder
    assert main(["configs"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert {"offline/dpo", "tiny-cpu/rloo", "quickstart", "eval/mgsm-exact"} <= set(names)
    assert main(["train", "--print-config", "offline/dpo", "--loss.beta=0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "loss.beta: 0.25  # KL strength: DPO's and CoPG's beta, IPO's tau (target margin 1/(2 beta))."
        in lines
    )
    assert 'loss.name: "dpo"  # dpo|ipo|copg|sft|reward_model.' in lines
    assert any(x.startswith('output.export: "final"  # final|best. Offline runs:') for x in lines)
    assert not (tmp_path / "runs").exists()  # printed, nothing trained
    assert main(["train", "--print-config", "configs/tiny-cpu/ppo.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert 'algo.name: "ppo"  # rloo|reinforce|vanilla_pg|ppo|raft|copg.' in lines
    assert any(x.startswith("train.max_skipped_steps: 3  # Updates with a non-finite") for x in lines)
    from polyalign.config import RunConfig, leaves

    assert len(lines) == len(list(leaves(RunConfig())))  # every key, one line each


def test_a_used_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "tiny-cpu/rloo", f"--output.run_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --resume" in err and "--overwrite" in err
