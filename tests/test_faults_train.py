"""Training under faults and abuse: non-finite settings, runaway rewards and diverging updates end in named
errors with no non-finite weights written; zero/negative settings fail at load; kill -9 at random points of
online and offline training, resumed each time, ends with the weights of an uninterrupted run and every step
logged once. The kill tests are slow (subprocesses, several minutes): `pytest -m slow`."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyalign.cli import main
from polyalign.config import load_config
from polyalign.config_offline import load_offline_config
from polyalign.rewards import RewardError
from polyalign.train import offline
from polyalign.train.checkpoint import latest_checkpoint
from polyalign.train.offline import train_offline
from polyalign.train.online import train_online
from polyalign.train.optim import NonFiniteError

ONLINE = [
    "--reward.functions={lexicon_sentiment: 1.0}",
    "--rollout.prompts_per_step=2",
    "--rollout.samples_per_prompt=2",
    "--rollout.max_new_tokens=6",
    "--eval.num_prompts=4",
    "--eval.max_new_tokens=6",
    "--output.progress=false",
    "--output.report=false",
    "--model.threads=1",
]
OFFLINE = [
    "--data.max_length=48",
    "--data.max_prompt_length=24",
    "--train.batch_size=4",
    "--eval.batch_size=8",
    "--data.eval_fraction=0.25",
    "--output.progress=false",
    "--output.report=false",
    "--model.threads=1",
]


def huge_reward(prompts, completions, **columns):
    return torch.full((len(completions),), 1e38)


def write_pairs(path: Path, n: int = 24) -> Path:
    rows = [
        {
            "prompt": f"Story {i}: once upon a time, Tom",
            "chosen": " was good and kind.",
            "rejected": " was mean.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_written_weights_finite(run_dir: Path) -> None:
    """Every checkpoint and the exported model hold finite weights only (or there are none)."""
    for path in [*run_dir.glob("checkpoints/step_*/*.safetensors"), *run_dir.glob("model/*.safetensors")]:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


# ---------------------------------------------------------------- fast: named errors, nothing non-finite written


@pytest.mark.parametrize(
    "override, key",
    [
        ("--train.lr=inf", "train.lr"),
        ("--algo.kl_coef=nan", "algo.kl_coef"),
        ("--rollout.prompts_per_step=0", ""),
    ],
)
def test_bad_settings_fail_at_load_with_one_line(tmp_path, capsys, override, key):
    """Before any model loads: no run directory is created."""
    run_dir = tmp_path / "run"
    assert main(["train", "tiny-cpu/rloo", override, f"--output.run_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (key or override[2:].split("=")[0]) in err and "Traceback" not in err
    assert not run_dir.exists()
    assert main(["train", "offline/dpo", "--train.batch_size=-1", f"--output.run_dir={run_dir}"]) == 1
    assert "train.batch_size must be > 0, got -1" in capsys.readouterr().err and not run_dir.exists()


def test_a_runaway_reward_is_an_error_naming_the_reward(tmp_path):
    cfg = load_config(
        None,
        [*ONLINE, "--reward.functions={tests.test_faults_train:huge_reward: 1.0}", "--train.steps=2"]
        + [f"--output.run_dir={tmp_path / 'run'}", "--eval.every=0", "--output.checkpoint_every=1"],
    )
    with pytest.raises(
        RewardError, match=r"reward 'tests.test_faults_train:huge_reward' returned 1e\+38.*max_abs"
    ):
        train_online(cfg)
    assert latest_checkpoint(tmp_path / "run") is None
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().strip()  # not even one step logged with inf


def test_a_diverging_update_stops_online_training_before_anything_is_saved(tmp_path, capsys):
    """lr 1e39 is a finite number (it loads) but overflows float32 in the first update: a named error, no
    checkpoint, exit status 1."""
    run_dir = tmp_path / "run"
    args = ["train", *ONLINE, "--train.lr=1e39", "--train.steps=3", "--output.checkpoint_every=1"]
    assert main([*args, "--eval.every=0", f"--output.run_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteError: the update made weights non-finite" in err and "lower train.lr" in err
    assert latest_checkpoint(run_dir) is None
    assert_written_weights_finite(run_dir)


def test_a_diverging_update_exports_no_offline_model(tmp_path):
    cfg = load_offline_config(
        None,
        [
            *OFFLINE,
            f"--data.train={write_pairs(tmp_path / 'pairs.jsonl')}",
            "--train.steps=3",
            "--train.lr=1e39",
        ]
        + [f"--output.run_dir={tmp_path / 'run'}", "--output.checkpoint_every=1"],
    )
    with pytest.raises(NonFiniteError):
        train_offline(cfg)
    assert not (tmp_path / "run" / "model").exists() and latest_checkpoint(tmp_path / "run") is None


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    """A loss that turns NaN from step 3 on: steps 3 and 4 are skipped (weights untouched, logged as skipped);
    the third in a row (train.max_skipped_steps=3) stops the run naming the setting. The checkpoints written
    (steps 1..4) hold finite weights."""
    sft = offline.LOSSES["sft"]
    calls = {"n": 0}

    def nan_from_step_3(lc, batch, ref, chosen, rejected, use_rejected):
        loss, stats, margins = sft(lc, batch, ref, chosen, rejected, use_rejected)
        if use_rejected is not None:  # training, not evaluation
            calls["n"] += 1
            loss = loss * float("nan") if calls["n"] >= 3 else loss
        return loss, stats, margins

    monkeypatch.setitem(offline.LOSSES, "sft", nan_from_step_3)
    cfg = load_offline_config(
        None,
        [
            *OFFLINE,
            f"--data.train={write_pairs(tmp_path / 'pairs.jsonl')}",
            "--train.steps=8",
            "--loss.name=sft",
        ]
        + [f"--output.run_dir={tmp_path / 'run'}", "--output.checkpoint_every=1"],
    )
    with pytest.raises(NonFiniteError, match=r"3 updates in a row.*train.max_skipped_steps=3"):
        train_offline(cfg)
    rows = [m for m in metrics(tmp_path / "run") if "loss" in m and "eval/loss" not in m]
    assert [(m["step"], m["skipped_steps"]) for m in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    assert_written_weights_finite(tmp_path / "run")


# ---------------------------------------------------------------- slow: kill -9 at random points, resume


def run_with_kills(args: list[str], run_dir: Path, kills: int, seed: int) -> None:
    """Start the run, kill -9 it after a random delay (start-up included, so some kills land before the
    first checkpoint), resume it the same way `kills` times, then let the last resume finish."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "polyalign.cli", "train", *args, f"--output.run_dir={run_dir}"]
    for attempt in range(kills + 1):
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen(
            [*command, *resume], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if attempt == kills:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-2000:]
            return
        deadline = time.time() + rng.uniform(3.0, 25.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_same_run(killed: Path, clean: Path, steps: int, eval_steps: list[int]) -> None:
    rows = metrics(killed)
    assert [m["step"] for m in rows if "loss" in m and "eval/loss" not in m] == list(range(1, steps + 1))
    evals = [m["step"] for m in rows if any(k.startswith("eval/") for k in m)]
    assert evals == eval_steps, "every evaluation logged once"
    name = f"checkpoints/step_{steps:06d}"
    for path in (clean / name).glob("*.safetensors"):
        a, b = load_file(path), load_file(killed / name / path.name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{path.name}: {key} differs after kill -9 and resume"


@pytest.mark.slow
def test_online_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(tmp_path):
    args = [*ONLINE, "--algo.name=reinforce", "--train.steps=12", "--train.lr=1e-2", "--eval.every=4"]
    args += ["--output.checkpoint_every=2", "--output.sample_every=1"]
    run_with_kills(args, tmp_path / "killed", kills=4, seed=0)
    subprocess.run(
        [sys.executable, "-m", "polyalign.cli", "train", *args, f"--output.run_dir={tmp_path / 'clean'}"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    assert_same_run(tmp_path / "killed", tmp_path / "clean", 12, [0, 4, 8, 12])
    samples = [
        json.loads(x)["step"] for x in (tmp_path / "killed" / "samples.jsonl").read_text().splitlines()
    ]
    assert sorted(set(samples)) == list(range(12)) and len(samples) == 12 * 4, "samples logged once"
    assert sorted(p.name for p in (tmp_path / "killed" / "eval").iterdir()) == sorted(
        p.name for p in (tmp_path / "clean" / "eval").iterdir()
    )


@pytest.mark.slow
def test_offline_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=48)
    args = ["offline/dpo", *OFFLINE, f"--data.train={data}", "--train.steps=16", "--train.lr=1e-2"]
    args += ["--eval.every=4", "--output.checkpoint_every=3", "--output.export=best"]
    run_with_kills(args, tmp_path / "killed", kills=4, seed=1)
    subprocess.run(
        [sys.executable, "-m", "polyalign.cli", "train", *args, f"--output.run_dir={tmp_path / 'clean'}"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    assert_same_run(tmp_path / "killed", tmp_path / "clean", 16, [0, 4, 8, 12, 16])
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["model_step"] == summary["best_eval"]["step"]
    assert_written_weights_finite(tmp_path / "killed")
