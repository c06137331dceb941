"""Online trainer: every algorithm runs and changes the policy, resume reproduces the uninterrupted run,
bad input fails clearly. Tiny settings on the shipped stories260K model with a rule reward (fast)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyalign.config import ConfigError, load_config
from polyalign.rewards import RewardError
from polyalign.train.online import group_minibatches, train_loop, train_online
from polyalign.train.run import setup_run

TINY = [
    "--reward.functions={lexicon_sentiment: 1.0}",
    "--rollout.prompts_per_step=2",
    "--rollout.samples_per_prompt=2",
    "--rollout.max_new_tokens=6",
    "--eval.every=0",
    "--output.progress=false",
    "--output.report=false",
    "--output.sample_every=0",
    "--train.steps=2",
]


def tiny_cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"--output.run_dir={tmp_path / 'run'}", *extra])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["rloo", "reinforce", "vanilla_pg", "raft", "copg", "ppo"])
def test_every_algorithm_trains(tmp_path, algo):
    cfg = tiny_cfg(tmp_path, f"--algo.name={algo}", "--train.lr=1e-2")
    run = setup_run(cfg)
    before = {k: v.clone() for k, v in run.policy.state_dict().items()}
    train_loop(run)
    rows = [m for m in metrics(cfg.output.run_dir) if "loss" in m]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in rows)
    changed = [k for k, v in run.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before), f"{algo}: parameters left unchanged: {set(before) - set(changed)}"


def test_group_minibatches_keep_whole_groups():
    parts = group_minibatches(num_groups=4, group_size=3, parts=2, micro_rows=3)
    assert [[r.tolist() for r in micros] for micros in parts] == [
        [[0, 1, 2], [6, 7, 8]],  # strided: groups 0 and 2
        [[3, 4, 5], [9, 10, 11]],  # groups 1 and 3
    ]


def test_resume_matches_uninterrupted_run(tmp_path):
    common = ["--train.steps=4", "--output.checkpoint_every=2", "--train.lr=1e-2", "--algo.name=reinforce"]
    full = tiny_cfg(tmp_path / "a", *common)
    train_online(full)
    half = tiny_cfg(tmp_path / "b", *common, "--output.checkpoint_every=2")
    run = setup_run(half)
    run.cfg = load_config(
        None, [*TINY, f"--output.run_dir={half.output.run_dir}", *common[1:], "--train.steps=2"]
    )
    train_loop(run)  # stops after step 2, as if killed right after its checkpoint
    train_online(half, resume=True)
    a = {m["step"]: m for m in metrics(full.output.run_dir) if "loss" in m}
    b = {m["step"]: m for m in metrics(half.output.run_dir) if "loss" in m}
    assert sorted(b) == [1, 2, 3, 4], "resume must not duplicate or drop metric lines"
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-6)
        assert b[step]["reward"] == pytest.approx(a[step]["reward"], rel=1e-4, abs=1e-6)


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "--train.steps=1")
    train_online(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        setup_run(cfg)


def bad_reward(prompts, completions, **columns):
    return torch.full((len(completions),), float("nan"))


def raising_reward(prompts, completions, **columns):
    raise RuntimeError("judge is down")


@pytest.mark.parametrize("fn, message", [("bad_reward", "NaN"), ("raising_reward", "judge is down")])
def test_bad_reward_is_a_clear_error(tmp_path, fn, message):
    cfg = tiny_cfg(tmp_path, f"--reward.functions={{tests.test_online:{fn}: 1.0}}")
    with pytest.raises((RewardError, ValueError), match=message):
        train_online(cfg)


def test_too_long_prompt_names_the_row(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "Once upon a time"}) + "\n" + json.dumps({"prompt": "word " * 300}) + "\n"
    )
    cfg = tiny_cfg(tmp_path, f"--data.prompts={path}", "--data.eval_prompts=null")
    with pytest.raises(ValueError, match="prompt 2 has"):
        setup_run(cfg)


def test_unknown_algorithm_and_small_k():
    with pytest.raises(ConfigError, match="algo.name: .grpo. not in"):
        load_config(None, ["--algo.name=grpo"])
    with pytest.raises(ConfigError, match=">= 2"):
        load_config(None, ["--rollout.samples_per_prompt=1"])


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "polyalign.cli",
        "train",
        *TINY,
        "--train.steps=40",
        "--output.checkpoint_every=1",
        f"--output.run_dir={run_dir}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.2)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*args, "--resume"], check=True, stdout=subprocess.DEVNULL, timeout=600)
    steps = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, 41))


@pytest.mark.slow
def test_quickstart_raises_the_held_out_reward(tmp_path):
    """The README's main job, as a user runs it: the held-out reward must rise and a report be written."""
    run_dir = tmp_path / "quickstart"
    done = subprocess.run(
        [sys.executable, "-m", "polyalign.cli", "train", f"--output.run_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_eval"]["eval/reward"] > summary["eval_start"]["eval/reward"] + 1.0
    assert (run_dir / "report.md").exists() and (run_dir / "plots" / "reward.png").exists()


@pytest.mark.parametrize(
    "extra",
    [["--model.dtype=bfloat16"], ["--model.gradient_checkpointing=true"], ["--train.micro_batch_size=2"]],
)
def test_bf16_checkpointing_and_micro_batches_train(tmp_path, extra):
    cfg = tiny_cfg(tmp_path, "--train.lr=1e-2", *extra)
    run = setup_run(cfg)
    train_loop(run)
    rows = [m for m in metrics(cfg.output.run_dir) if "loss" in m]
    assert len(rows) == 2 and all(m["skipped_steps"] == 0 for m in rows)


def test_micro_batching_gives_the_full_batch_update(tmp_path):
    """Gradient accumulation over micro-batches updates the policy exactly like one full batch."""
    params = []
    for i, extra in enumerate([[], ["--train.micro_batch_size=2"]]):
        cfg = tiny_cfg(
            tmp_path / str(i), "--train.lr=1e-2", "--train.steps=1", "--algo.updates_per_batch=1", *extra
        )
        run = setup_run(cfg)
        train_loop(run)
        params.append(torch.cat([p.detach().flatten() for p in run.policy.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)
