"""The memory planner against real models: parameter counts, LoRA, FSDP/DDP, which models are held, the exact
weight + gradient + optimizer bytes after a real step, KV-cache bytes, and activations measured with a
saved-tensors hook (bytes autograd keeps for backward during one forward)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from polyalign.cli import main
from polyalign.config import load_config
from polyalign.config_offline import load_offline_config
from polyalign.logprobs import completion_logprobs
from polyalign.models import resolve_model_path
from polyalign.recipes.plan import (
    ADAM_STEP_BYTES,
    Shape,
    format_plan,
    layer_activation_bytes,
    plan_memory,
)
from polyalign.recipes.plan_models import OFFLINE_NEEDS_REFERENCE
from polyalign.train.loop import build_optimizer
from tests.conftest import tiny_llama_config

QUICK = ["--eval.every=0", "--output.progress=false"]


def online(*overrides: str):
    return load_config("configs/quickstart.yaml", [*QUICK, *overrides])


def roles(plan) -> dict:
    return {h.role: h for h in plan.models}


def numel(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_counts_equal_the_models_a_real_run_holds(tmp_path):
    from polyalign.train.run import setup_run

    cfg = online("--algo.name=ppo", f"--output.run_dir={tmp_path / 'run'}", "--output.report=false")
    run = setup_run(cfg)
    held = roles(plan_memory(cfg))
    assert set(held) == {"policy", "reference", "value_model", "reward_model"}
    assert held["policy"].params == numel(run.policy) == held["policy"].trainable_params
    assert held["reference"].params == numel(run.ref) and held["reference"].trainable_params == 0
    assert held["value_model"].params == numel(run.value_model) == held["value_model"].trainable_params
    assert held["value_model"].params > held["policy"].params  # the fresh scalar head
    reward_model = run.rewards["model:stories260K-sentiment-rm"].model
    assert held["reward_model"].params == numel(reward_model)
    assert held["reward_model"].dtype == str(reward_model.dtype).removeprefix("torch.")


def test_reference_only_when_the_run_needs_one():
    assert "reference" not in roles(plan_memory(online("--algo.kl_coef=0")))
    no_ref = plan_memory(online("--algo.kl_coef=0"))
    assert any("kl_coef = 0" in n for n in no_ref.notes)
    assert "reference" in roles(plan_memory(online("--algo.kl_coef=0", "--algo.name=copg")))
    assert "value_model" not in roles(plan_memory(online()))
    lexicon = plan_memory(online("--reward.functions={lexicon_sentiment: 1.0}"))
    assert "reward_model" not in roles(lexicon)


def test_lora_counts_the_adapter_exactly_and_holds_no_reference_copy():
    plan = plan_memory(online("--model.lora={r: 4, alpha: 8}"))
    held = roles(plan)
    real = AutoModelForCausalLM.from_pretrained(resolve_model_path("stories260K"))
    peft_model = get_peft_model(real, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert held["policy"].trainable_params == numel(peft_model, trainable_only=True) > 0
    assert held["policy"].params == numel(peft_model)
    assert held["policy"].bytes_grads == 4 * held["policy"].trainable_params  # float32 adapter
    assert "reference" not in held
    assert any("adapter disabled" in n for n in plan.notes)


def test_fsdp_shards_trained_models_and_ddp_replicates():
    one = roles(plan_memory(online("--model.parallel=fsdp"), world_size=1))
    fsdp_plan = plan_memory(online("--model.parallel=fsdp"), world_size=2)
    two = roles(fsdp_plan)
    for role in ("policy", "reference"):
        assert two[role].sharded and two[role].bytes_weights == math.ceil(one[role].bytes_weights / 2)
        assert two[role].bytes_grads == math.ceil(one[role].bytes_grads / 2)
    steps = ADAM_STEP_BYTES * sum(
        1 for p in AutoModelForCausalLM.from_pretrained(resolve_model_path("stories260K")).parameters()
    )
    assert two["policy"].bytes_optimizer - steps == math.ceil((one["policy"].bytes_optimizer - steps) / 2)
    assert two["reward_model"].sharded  # run.py shards scoring reward models under FSDP too
    assert two["reward_model"].bytes_weights == -(-one["reward_model"].bytes_weights // 2)
    # The gathered unit: at least one decoder layer's weights + grads, at most the whole policy's.
    assert 0 < fsdp_plan.bytes_fsdp_buffer < one["policy"].bytes_weights + one["policy"].bytes_grads
    assert fsdp_plan.bytes_fsdp_generation == one["policy"].bytes_weights  # gathered to generate
    assert fsdp_plan.bytes_ddp_buckets == 0
    ddp_plan = plan_memory(online("--model.parallel=ddp"), world_size=2)
    assert ddp_plan.bytes_ddp_buckets == one["policy"].bytes_grads and ddp_plan.bytes_fsdp_buffer == 0
    ddp = roles(ddp_plan)
    assert not ddp["policy"].sharded
    assert (ddp["policy"].bytes_weights, ddp["policy"].bytes_optimizer) == (
        one["policy"].bytes_weights,
        one["policy"].bytes_optimizer,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_grads_optimizer_bytes_equal_a_real_step(dtype):
    plan = plan_memory(online(f"--model.dtype={dtype}"))
    policy = roles(plan)["policy"]
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("stories260K"), dtype=getattr(torch, dtype)
    ).train()
    optimizer = build_optimizer(model.named_parameters(), lr=1e-3)
    ids = torch.randint(3, 512, (2, 12))
    completion_logprobs(
        model, ids[:, :4], torch.ones_like(ids[:, :4]), ids[:, 4:], torch.ones_like(ids[:, 4:])
    ).sum().backward()
    optimizer.step()
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert (policy.bytes_weights, policy.bytes_grads, policy.bytes_optimizer) == (weights, grads, states)


def test_kv_cache_equals_the_fast_decode_cache():
    from polyalign.rollout.fast_llama import FastLlama

    plan = plan_memory(online("--rollout.prompts_per_step=4", "--data.max_prompt_tokens=20"))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("stories260K"))
    fast = FastLlama(model, rows=16, max_len=20 + 64)
    assert plan.bytes_kv_cache == fast.k_cache.nbytes + fast.v_cache.nbytes > 0
    assert plan.phases["generation"] < plan.phases["training"] == plan.bytes_peak
    four = plan_memory(online("--rollout.prompts_per_step=4", "--data.max_prompt_tokens=20"), world_size=4)
    assert four.bytes_kv_cache == plan.bytes_kv_cache // 4  # each process generates its share of the rows


def test_micro_batch_rows_follow_the_online_loop():
    from polyalign.train.online import group_minibatches

    for micro in (0, 3, 8, 20):
        plan = plan_memory(online(f"--train.micro_batch_size={micro}"))
        parts = group_minibatches(16, 4, 2, micro)
        assert plan.train_rows == max(len(rows) for micros in parts for rows in micros)
    assert plan_memory(online(), world_size=4).train_rows == 8


def saved_bytes(model: torch.nn.Module, rows: int, prompt: int, completion: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    prompt_ids, completion_ids = (
        torch.randint(3, 512, (rows, prompt)),
        torch.randint(3, 512, (rows, completion)),
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(
            model, prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)
        )
    return sum(seen.values())


@pytest.mark.parametrize("dtype,checkpointing", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_activation_estimate_matches_saved_tensors(tmp_path, dtype, checkpointing):
    config = tiny_llama_config(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=4,
    )
    config.save_pretrained(tmp_path)
    cfg = load_config(
        None,
        [
            f"--model.policy={tmp_path}",
            f"--model.dtype={dtype}",
            f"--model.gradient_checkpointing={checkpointing}",
            "--reward.functions={lexicon_sentiment: 1.0}",
            "--rollout.prompts_per_step=2",
            "--rollout.samples_per_prompt=2",
            "--algo.updates_per_batch=1",
            "--data.max_prompt_tokens=48",
            "--rollout.max_new_tokens=48",
            "--eval.every=0",
        ],
    )
    plan = plan_memory(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = saved_bytes(model, plan.train_rows, 48, 48)
    planned = plan.bytes_activations + plan.train_rows * plan.completion_tokens * config.vocab_size * 4
    if checkpointing:  # the hook sees the forward only; the planner adds one layer recomputed in backward
        planned -= (
            plan.train_rows
            * plan.train_seq
            * layer_activation_bytes(shape_of(config), 2 if dtype == "bfloat16" else 4)
        )
    assert 0.9 < planned / measured < 1.1, (planned, measured)


def shape_of(config) -> Shape:
    heads = config.num_attention_heads
    return Shape(
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        heads,
        config.num_key_value_heads,
        config.hidden_size // heads,
        config.vocab_size,
    )


def test_offline_reference_is_freed_after_precompute():
    dpo = plan_memory(load_offline_config("configs/offline/dpo.yaml"))
    assert set(roles(dpo)) == {"policy"} and any("freed after precompute" in n for n in dpo.notes)
    assert dpo.train_rows == 2 * 8 and dpo.train_seq == 128  # chosen + rejected of 8 pairs
    separate = plan_memory(load_offline_config("configs/offline/dpo.yaml", ["--model.reference=stories260K"]))
    ref = roles(separate)["reference"]
    assert ref.setup_only and "reference precompute" in separate.phases
    assert separate.phases["training"] == dpo.phases["training"]  # freed before training
    held = plan_memory(load_offline_config("configs/offline/dpo.yaml", ["--reference.precompute=false"]))
    assert not roles(held)["reference"].setup_only
    assert held.phases["training"] == dpo.phases["training"] + roles(held)["reference"].bytes_weights
    sft = plan_memory(load_offline_config("configs/offline/dpo.yaml", ["--loss.name=sft"]))
    assert set(roles(sft)) == {"policy"} and sft.train_rows == 8


def test_offline_reward_model_counts_the_classifier():
    from polyalign.models import load_base_classifier
    from polyalign.train.offline_run import NEEDS_REFERENCE

    assert OFFLINE_NEEDS_REFERENCE == NEEDS_REFERENCE
    plan = plan_memory(load_offline_config("configs/offline/reward_model.yaml"))
    model, _ = load_base_classifier("stories260K", 0)
    assert isinstance(model, type(AutoModelForSequenceClassification.from_config(model.config)))
    assert roles(plan)["reward_model"].trainable_params == numel(model)
    assert plan.bytes_logits == 0


def test_lora_reward_model_counts_adapter_and_head():
    from polyalign.config import LoraConfig
    from polyalign.lora import apply_lora
    from polyalign.models import load_base_classifier

    cfg = load_offline_config("configs/offline/reward_model.yaml", ["--model.lora={r: 4}"])
    held = roles(plan_memory(cfg))["reward_model"]
    model = apply_lora(load_base_classifier("stories260K", 0)[0], LoraConfig(r=4))
    assert (held.params, held.trainable_params) == (numel(model), numel(model, trainable_only=True))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="world_size"):
        plan_memory(online(), world_size=0)
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        plan_memory(online(), gpu_memory_gib=-1)
    with pytest.raises(ValueError, match=r"prompts_per_step \(16\) must be a multiple"):
        plan_memory(online(), world_size=3)
    with pytest.raises(ValueError, match="train.batch_size"):
        plan_memory(load_offline_config("configs/offline/dpo.yaml"), world_size=3)
    with pytest.raises(ValueError, match="cannot read the config"):
        plan_memory(online(f"--model.policy={tmp_path}"))


def test_cli_plan_text_json_offline_and_fit(capsys):
    assert (
        main(["plan", "configs/quickstart.yaml", "--json", "--train.micro_batch_size=8", "--nproc", "2"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["train_rows"] == 8 and data["world_size"] == 2 and data["kind"] == "online"
    assert main(["plan", "configs/offline/dpo.yaml", "--gpu-memory=0.001"]) == 0
    text = capsys.readouterr().out
    assert "offline dpo" in text and "does NOT fit" in text and "PEAK per process" in text
    with pytest.raises(SystemExit, match="model.dtype"):
        main(["plan", "--model.dtype=int8"])
    text = format_plan(plan_memory(online()))
    for row in ("policy", "reference", "reward_model", "activations", "KV cache", "phase: training"):
        assert f"\n{row} " in text
