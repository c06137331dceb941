"""Trainers with LoRA (one model in memory: the reference is the base with the adapter disabled; adapter and
merged exports next to each checkpoint) and the engine/trainer log-prob mismatch with its truncated
importance-sampling correction."""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from polyalign.config import load_config
from polyalign.config_offline import load_offline_config
from polyalign.lora import ReferenceView
from polyalign.train.offline import train_offline
from polyalign.train.online import generate_phase, importance_corrected, train_loop
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
    "--train.lr=1e-2",
]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_online_lora_holds_one_model_and_exports_adapter_and_merged(tmp_path):
    cfg = load_config(None, [*TINY, f"--output.run_dir={tmp_path}", "--model.lora={r: 4, save: both}"])
    run = setup_run(cfg)
    assert isinstance(run.policy, PeftModel) and isinstance(run.ref, ReferenceView)
    storages = {p.untyped_storage().data_ptr() for p in run.policy.parameters()}
    assert all(p.untyped_storage().data_ptr() in storages for p in run.ref.parameters())  # no copy
    base = {k: v.clone() for k, v in run.policy.state_dict().items() if "lora_" not in k}
    train_loop(run)
    after = run.policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items()), "LoRA changed a base weight"
    ckpt = tmp_path / "checkpoints" / "step_000002"
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged")
    ids = torch.tensor([[1, 400, 33, 90, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, run.policy(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    assert all(m["mismatch/token_abs_mean"] < 1e-4 for m in metrics(tmp_path) if "loss" in m)


def test_offline_dpo_lora_with_on_the_fly_reference(tmp_path):
    cfg = load_offline_config(
        "configs/offline/dpo.yaml",
        [
            f"--output.run_dir={tmp_path}",
            "--model.lora.r=4",
            "--reference.precompute=false",
            "--train.steps=2",
            "--train.warmup_steps=0",
            "--data.max_length=64",
            "--data.max_prompt_length=32",
            "--eval.every=0",
            "--output.report=false",
            "--output.progress=false",
        ],
    )
    summary = train_offline(cfg)
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()
    first = [m for m in metrics(tmp_path) if "loss" in m][0]
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)  # policy == reference at step 0
    assert summary["steps"] == 2


def test_truncated_importance_weights(tmp_path):
    """A sampler whose log-probs sit 0.2 nats/token below the trainer's: w = min(exp(0.2 * length), cap)."""
    cfg = load_config(None, [*TINY, f"--output.run_dir={tmp_path}", "--algo.importance_correction=tis"])
    run = setup_run(cfg)
    rollout = generate_phase(run, 0)
    mask = rollout.completion_mask
    shifted = dataclasses.replace(rollout, logprobs=rollout.logprobs - 0.2 * mask)
    advantages = torch.linspace(-1, 1, mask.shape[0])
    parts = [[torch.arange(mask.shape[0])]]
    corrected, stats = importance_corrected(run, shifted, advantages, parts)
    expected = advantages * torch.clamp(torch.exp(0.2 * mask.sum(-1).float()), max=2.0)
    torch.testing.assert_close(corrected, expected, atol=1e-4, rtol=1e-4)
    assert abs(stats["mismatch/token_abs_mean"] - 0.2) < 1e-4
    assert stats["importance_weight_capped"] == float((0.2 * mask.sum(-1) > math.log(2)).float().mean())
    unshifted, _ = importance_corrected(run, rollout, advantages, parts)  # same numerics: weights 1
    torch.testing.assert_close(unshifted, advantages, atol=1e-4, rtol=0)
