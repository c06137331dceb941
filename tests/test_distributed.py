"""torchrun on CPU (gloo, 2 processes): the same run on 1 and 2 processes gives the same losses and weights.

Each run is a real `polyalign train` command line; the 2-process one is launched by torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node=2 -m polyalign.cli train ...`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyalign.config import load_config
from polyalign.train.distributed import World, shard
from polyalign.train.run import check_split

ONLINE = [
    "--train.steps=2",
    "--rollout.prompts_per_step=4",
    "--rollout.samples_per_prompt=2",
    "--rollout.max_new_tokens=8",
    "--algo.updates_per_batch=2",
    "--train.lr=1e-5",
    "--eval.every=1",  # greedy held-out evaluation (inference mode) between FSDP training steps
    "--eval.num_prompts=4",
    "--eval.max_new_tokens=8",
    "--output.checkpoint_every=1",
    "--output.sample_every=0",
    "--output.report=false",
    "--output.progress=false",
]
OFFLINE = [
    "--train.steps=2",
    "--train.batch_size=4",
    "--train.warmup_steps=0",
    "--train.lr=1e-5",
    "--data.max_length=64",
    "--data.max_prompt_length=32",
    "--eval.every=0",
    "--output.checkpoint_every=1",
    "--output.report=false",
    "--output.progress=false",
]
ROOT = Path(__file__).resolve().parents[1]


def polyalign_train(nproc: int, run_dir: Path, *args: str) -> None:
    """`polyalign train ARGS` in fresh processes: directly (nproc 1) or under torchrun (nproc > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", "polyalign.cli", "train", *args, f"--output.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def logged(run_dir: Path, key: str) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


def weights(run_dir: Path, step: int, name: str = "policy") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / f"{name}.safetensors"))


def assert_same_run(a: Path, b: Path, step: int, name: str = "policy") -> None:
    assert logged(a, "loss") == pytest.approx(logged(b, "loss"), rel=1e-4, abs=1e-5)
    for key in ("eval/reward", "eval/accuracy"):
        assert logged(a, key) == pytest.approx(logged(b, key), rel=1e-4, abs=1e-5)
    wa, wb = weights(a, step, name), weights(b, step, name)
    assert wa.keys() == wb.keys()
    before = weights(a, step - 1, name)  # every run here checkpoints every step
    for key in wa:  # lr 1e-5 everywhere; at most 2 optimizer steps per training step
        assert_same_adam_update(wa[key], wb[key], before[key], lr=1e-5, steps=2 * step, what=key)
    start = load_file(str(ROOT / "polyalign/assets/stories260K/model.safetensors"))
    moved = [k for k in start if k in wa and not torch.allclose(wa[k], start[k])]
    assert moved, "training changed no weight: the comparison would be vacuous"


def test_shard_splits_evenly_or_names_the_setting():
    assert shard(8, World(rank=1, size=2), "x") == slice(4, 8)
    assert shard(8, World(), "x") == slice(0, 8)
    with pytest.raises(ValueError, match=r"rollout.prompts_per_step \(6\) must be a multiple .* \(4\)"):
        shard(6, World(rank=0, size=4), "rollout.prompts_per_step")


def test_online_split_needs_whole_groups_per_process_and_minibatch():
    cfg = load_config(None, ["--rollout.prompts_per_step=6", "--algo.updates_per_batch=2"])
    check_split(cfg, World())
    with pytest.raises(ValueError, match=r"prompts_per_step \(6\) must be a multiple of .* \(2 x 2\)"):
        check_split(cfg, World(rank=1, size=2))


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_online_rloo_one_vs_two_processes(tmp_path, parallel):
    args = [*ONLINE, f"--model.parallel={parallel}"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert_same_run(tmp_path / "one", tmp_path / "two", step=2)
    assert logged(tmp_path / "two", "rows_per_process") == [4, 4]  # each process sampled half the batch
    assert len(logged(tmp_path / "two", "eval/reward")) == 3  # steps 0, 1, 2 evaluated


def test_offline_dpo_one_vs_two_processes_fsdp(tmp_path):
    args = ["configs/offline/dpo.yaml", *OFFLINE, "--model.parallel=fsdp"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert_same_run(tmp_path / "one", tmp_path / "two", step=2)
    assert logged(tmp_path / "two", "pairs_per_process") == [2, 2]
    assert len(logged(tmp_path / "two", "eval/accuracy")) == 2  # held-out pairs at the start and the end


def test_sharded_checkpoints_resume_across_process_counts(tmp_path):
    """output.checkpoint_format=sharded (torch.distributed.checkpoint, each process writes its shards):
    1 process -> 2 FSDP processes -> 1 process, each resuming the last, equals 1 process for 3 steps."""

    def steps(n: int, fmt: str) -> list[str]:
        kept = [a for a in ONLINE if not a.startswith("--train.steps")]
        return [*kept, f"--train.steps={n}", f"--output.checkpoint_format={fmt}"]

    polyalign_train(1, tmp_path / "one", *steps(3, "full"))
    polyalign_train(1, tmp_path / "mixed", *steps(1, "sharded"))
    polyalign_train(2, tmp_path / "mixed", *steps(2, "sharded"), "--model.parallel=fsdp", "--resume")
    polyalign_train(1, tmp_path / "mixed", *steps(3, "full"), "--resume")
    written_by_two = tmp_path / "mixed" / "checkpoints" / "step_000002"
    assert (written_by_two / "sharded" / ".metadata").is_file()
    assert json.loads((written_by_two / "state.json").read_text())["format"] == "sharded"
    assert_same_run(tmp_path / "one", tmp_path / "mixed", step=3)


@pytest.mark.slow
def test_offline_dpo_one_vs_two_processes_ddp(tmp_path):
    args = ["configs/offline/dpo.yaml", *OFFLINE, "--model.parallel=ddp"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert_same_run(tmp_path / "one", tmp_path / "two", step=2)


def test_online_lora_one_vs_two_processes_fsdp(tmp_path):
    """LoRA under FSDP: the reference is the policy's own FSDP root with the adapter disabled."""
    args = [*ONLINE, "--model.parallel=fsdp", "--model.lora={r: 4, save: both}", "--train.lr=1e-3"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert logged(tmp_path / "one", "loss") == pytest.approx(
        logged(tmp_path / "two", "loss"), rel=1e-4, abs=1e-5
    )
    one, two = weights(tmp_path / "one", 2), weights(tmp_path / "two", 2)
    adapters = [k for k in one if "lora_B" in k]
    assert adapters and all(one[k].abs().max() > 0 for k in adapters)  # trained away from B = 0
    before = weights(tmp_path / "one", 1)
    for key in one:
        if "lora_" not in key:  # the base weights are frozen: bit for bit
            torch.testing.assert_close(one[key], two[key], rtol=0, atol=0, msg=key)
            continue
        assert_same_adam_update(one[key], two[key], before[key], lr=1e-3, steps=4, what=key)
    merged = tmp_path / "two" / "checkpoints" / "step_000002" / "merged" / "model.safetensors"
    plain = load_file(str(merged))
    reference = load_file(
        str(tmp_path / "one" / "checkpoints" / "step_000002" / "merged" / "model.safetensors")
    )
    for key in plain:
        # W + scale * B A: an A element that differs by up to `adam_bound` moves W by at most
        # scale * r * max|B| * adam_bound (scale = alpha / r = 1 by default, r = 4).
        bound = 4 * max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) * 2 * 1e-3 * 4
        torch.testing.assert_close(plain[key], reference[key], rtol=0, atol=bound + 1e-6, msg=key)


def assert_same_adam_update(
    a: torch.Tensor, b: torch.Tensor, before: torch.Tensor, lr: float, steps: int, what: str
) -> None:
    """Two runs that differ only in reduction order (1 process vs 2 summing gradients) took the same Adam
    steps from `before`, within what float32 noise can do to Adam.

    Why not an elementwise atol: Adam divides each gradient by its own running magnitude, so where a
    gradient is within rounding noise of zero (lora_A's, while B is still about 0) the noise decides a step
    of up to lr in either direction. Such elements are rare; a real bug (a gradient not all-reduced, a wrong
    shard) changes most elements. So: (1) no element differs by more than Adam can move it, 2 * lr per
    step; (2) at most 2% of the elements differ by more than 1% of one step; (3) the difference is at most
    5% of the size of the update (Frobenius norms) -- measured here: at most 2 of 256 elements and 1.1%.
    """
    diff = (a - b).abs()
    assert float(diff.max()) <= 2 * lr * steps, what
    assert float((diff > 0.01 * lr).float().mean()) <= 0.02, what
    update = (a - before).norm()
    assert float(diff.norm()) <= 0.05 * float(update) + 1e-9, what


def test_checkpoints_resume_across_process_counts(tmp_path):
    """1 process trains step 1, 2 FSDP processes resume it for step 2, 1 process resumes for step 3: the
    same as 1 process for 3 steps (full weights and index-keyed AdamW state load into shards and back)."""

    def steps(n: int) -> list[str]:
        return [a for a in ONLINE if not a.startswith("--train.steps")] + [f"--train.steps={n}"]

    polyalign_train(1, tmp_path / "one", *steps(3))
    polyalign_train(1, tmp_path / "mixed", *steps(1))
    polyalign_train(2, tmp_path / "mixed", *steps(2), "--model.parallel=fsdp", "--resume")
    polyalign_train(1, tmp_path / "mixed", *steps(3), "--resume")
    assert_same_run(tmp_path / "one", tmp_path / "mixed", step=3)


@pytest.mark.slow
def test_offline_reward_model_one_vs_two_processes_fsdp(tmp_path):
    args = ["configs/offline/reward_model.yaml", *OFFLINE, "--model.parallel=fsdp"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert_same_run(tmp_path / "one", tmp_path / "two", step=2, name="reward_model")


@pytest.mark.slow
def test_ppo_runs_on_two_processes(tmp_path):
    """PPO shuffles minibatches within each process: it runs distributed, but is not compared number for number."""
    polyalign_train(2, tmp_path / "ppo", *ONLINE, "--algo.name=ppo", "--model.parallel=fsdp")
    assert logged(tmp_path / "ppo", "rows_per_process") == [4, 4]
    assert all(math.isfinite(x) for x in logged(tmp_path / "ppo", "loss"))


@pytest.mark.slow
def test_offline_dpo_lora_one_vs_two_processes_fsdp(tmp_path):
    """DPO with the adapter-disabled reference run on the fly (no cache) through the policy's FSDP root."""
    args = ["configs/offline/dpo.yaml", *OFFLINE, "--model.parallel=fsdp", "--model.lora.r=4"]
    args += ["--reference.precompute=false", "--train.lr=1e-3"]
    polyalign_train(1, tmp_path / "one", *args)
    polyalign_train(2, tmp_path / "two", *args)
    assert logged(tmp_path / "one", "loss") == pytest.approx(
        logged(tmp_path / "two", "loss"), rel=1e-4, abs=1e-5
    )
    assert logged(tmp_path / "two", "loss")[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
    assert (tmp_path / "two" / "model" / "adapter" / "adapter_model.safetensors").is_file()
