"""LoRA through peft (polyalign/lora.py) on the shipped stories260K model: the reference view is exactly the
base model, the adapter comes back on after every call, only adapters train, and both export formats reload
to the policy's log-probs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from polyalign.config import LoraConfig
from polyalign.data.chat import PreferenceBatch
from polyalign.logprobs import completion_logprobs, reference_sequence_logprobs, value_forward
from polyalign.lora import (
    apply_lora,
    export_lora,
    lora_state_dict,
    merged_state_dict,
    reference_view,
    trainable_summary,
)
from polyalign.models import resolve_model_path
from polyalign.rewards.model import sequence_scores
from polyalign.rollout.hf import HFEngine
from polyalign.types import Sampling
from tests.conftest import model_atol

PATH = resolve_model_path("stories260K")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _load(cls=AutoModelForCausalLM, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(PATH, **kwargs)


def _batch(seed: int = 0):
    """(prompt_ids, prompt_mask, completion_ids, completion_mask): 3 rows, left-padded prompts, one
    right-padded completion."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 512, (3, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, 512, (3, 6), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _train(policy: nn.Module, steps: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    """A few AdamW steps raising the log-probs of a fixed batch (so the adapter's output is nonzero)."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    policy.train()
    for _ in range(steps):
        loss = -completion_logprobs(policy, *_batch()).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.fixture
def trained():
    """(pristine base copy in eval mode, LoRA policy trained 3 steps, still in train mode)."""
    model = _load()
    pristine = copy.deepcopy(model).eval()
    policy = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    _train(policy)
    return pristine, policy


def _flags(policy: nn.Module):
    return [m.training for m in policy.modules()], [p.requires_grad for p in policy.parameters()]


def test_reference_view_is_the_pristine_base(trained):
    pristine, policy = trained
    ref = reference_view(policy)
    with torch.inference_mode():
        expected = completion_logprobs(pristine, *_batch(1))
        got_inference = completion_logprobs(ref, *_batch(1))
    got_grad_mode = completion_logprobs(ref, *_batch(1))  # grad mode on: the view still builds no graph
    assert torch.equal(got_inference, expected)
    assert torch.equal(got_grad_mode, expected) and not got_grad_mode.requires_grad
    with torch.no_grad():
        policy_logprobs = completion_logprobs(policy.eval(), *_batch(1))
    assert (policy_logprobs - expected).abs().max() > 1e-2  # the adapter really changes the outputs


def test_reference_view_runs_in_eval_mode():
    """With dropout in the model, a policy in train mode still gives the deterministic base log-probs."""
    model = _load(attention_dropout=0.5)
    pristine = copy.deepcopy(model).eval()
    policy = apply_lora(model, LoraConfig(r=4, dropout=0.5)).train()
    with torch.no_grad():
        assert torch.equal(
            completion_logprobs(reference_view(policy), *_batch()), completion_logprobs(pristine, *_batch())
        )
    assert all(m.training for m in policy.modules())


def test_adapter_is_back_after_a_call_and_after_an_exception(trained):
    _, policy = trained
    ref = reference_view(policy)
    flags = _flags(policy)
    with torch.no_grad():
        before = completion_logprobs(policy.eval(), *_batch(1))
    policy.train()
    flags = _flags(policy)
    with torch.inference_mode():
        completion_logprobs(ref, *_batch(1))
    assert _flags(policy) == flags
    frozen = policy.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    frozen.requires_grad_(False)  # a caller's own choice survives the view's disable/enable
    flags = _flags(policy)
    with torch.no_grad():
        completion_logprobs(ref, *_batch(1))
    assert _flags(policy) == flags and not frozen.requires_grad
    frozen.requires_grad_(True)
    flags = _flags(policy)

    def fail(module, args, output):
        raise RuntimeError("boom inside the reference forward")

    layer = policy.get_base_model().model.layers[2]
    handle = layer.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        completion_logprobs(ref, *_batch(1))
    handle.remove()
    assert _flags(policy) == flags
    assert policy.get_model_status().enabled is True
    with torch.no_grad():
        after = completion_logprobs(policy.eval(), *_batch(1))
    assert torch.equal(after, before)


def test_view_methods_never_reach_the_policy(trained):
    _, policy = trained
    ref = reference_view(policy)
    flags = _flags(policy)
    ref.eval().requires_grad_(False).to(torch.float64)
    assert _flags(policy) == flags
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    params = dict(ref.named_parameters())
    assert params and not any(p.requires_grad for p in params.values())
    assert not any("lora_" in name for name in params)
    assert ref.state_dict() == {} and list(ref.children()) == []
    with pytest.raises(ValueError, match="frozen"):
        ref.requires_grad_(True)
    with pytest.raises(TypeError, match="PeftModel"):
        reference_view(_load())


def test_offline_reference_and_generation_use_the_base(trained, stories):
    pristine, policy = trained
    ref = reference_view(policy)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(2)
    batch = PreferenceBatch(
        prompt_ids, prompt_mask, completion_ids, completion_mask, completion_ids.flip(1), completion_mask,
        [None] * 3,
    )  # fmt: skip
    for got, expected in zip(
        reference_sequence_logprobs(ref, batch), reference_sequence_logprobs(pristine, batch)
    ):
        assert torch.equal(got, expected)
    assert policy.training  # the offline helper's eval()/train() toggled only the view
    greedy = Sampling(max_new_tokens=8, temperature=0.0)
    prompts = ["Once upon a time", "The cat"]
    from_view = HFEngine(ref, stories[1]).generate(prompts, n=1, sampling=greedy)
    from_base = HFEngine(pristine, stories[1]).generate(prompts, n=1, sampling=greedy)
    assert torch.equal(from_view.completion_ids, from_base.completion_ids)
    assert policy.training


def _plain_name(name: str) -> str:
    return name.replace("base_layer.", "")


def test_only_adapters_train_and_the_base_stays_bit_identical(trained):
    pristine, policy = trained
    base = policy.get_base_model()
    assert type(base.lm_head) is nn.Linear  # "all-linear" leaves the output head alone
    adapted = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if hasattr(m, "lora_A")}
    assert adapted == PROJECTIONS
    reference = dict(pristine.named_parameters())
    for name, param in base.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
        else:
            assert not param.requires_grad and torch.equal(param, reference[_plain_name(name)]), name
    assert all(
        base.get_submodule(n).weight.abs().sum() > 0
        for n, m in base.named_modules()
        if n.endswith("lora_B.default")
    )
    loss = -completion_logprobs(policy, *_batch()).sum()
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())
    summary = trainable_summary(policy)
    expected = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    assert summary["trainable_params"] == expected and summary["total_params"] == expected + sum(
        p.numel() for p in pristine.parameters()
    )


def test_merged_state_dict_is_w_plus_scaled_ba_and_leaves_the_model_alone(trained):
    pristine, policy = trained
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = merged_state_dict(policy)
    assert set(merged) == set(pristine.state_dict())
    q = policy.get_base_model().model.layers[1].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = q.base_layer.weight + (8.0 / 4) * b @ a  # scaling = alpha / r
    assert torch.allclose(merged["model.layers.1.self_attn.q_proj.weight"], expected, atol=1e-7)
    assert torch.equal(merged["model.norm.weight"], pristine.model.norm.weight)
    after = policy.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    adapter = lora_state_dict(policy)
    assert adapter and all("lora_" in k for k in adapter)
    next(iter(adapter.values())).add_(1.0)  # a copy: the live adapter is untouched
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_exports_reload_to_the_policy(trained, stories, tmp_path):
    _, policy = trained
    written = export_lora(policy, tmp_path, "both", tokenizer=stories[1])
    assert written == [tmp_path / "adapter", tmp_path / "merged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no .tmp-* leftovers
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    policy.eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter = PeftModel.from_pretrained(_load(), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = completion_logprobs(policy, *_batch(1))
        # merged weights W + scale * B A differ from the adapter's two-step sum by float32 rounding
        atol = model_atol(expected, merged.config)
        assert torch.allclose(completion_logprobs(merged, *_batch(1)), expected, atol=atol)
        assert torch.allclose(completion_logprobs(adapter, *_batch(1)), expected, atol=atol)
    export_lora(policy, tmp_path, "adapter")  # re-exporting replaces the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]
    with pytest.raises(ValueError, match="adapter\\|merged\\|both"):
        export_lora(policy, tmp_path, "full")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = _load()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": reentrant}
                )
            else:  # transformers 4.x
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": reentrant}
                )
            # transformers may hook the embeddings to require grad here; apply_lora must not rely on it.
            if hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
        torch.manual_seed(7)  # same lora_A initialisation in both
        policy = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        _train(policy, steps=1)  # B != 0 afterwards, so A gets a nonzero gradient too
        policy.train()
        completion_logprobs(policy, *_batch()).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
        if checkpointing:
            ref = reference_view(policy)
            with torch.inference_mode():
                assert torch.equal(
                    completion_logprobs(ref, *_batch(1)), completion_logprobs(_load(), *_batch(1))
                )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5 * 3 * 2
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-5), name


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="nope_proj.*q_proj"):
        apply_lora(_load(), LoraConfig(target_modules=["q_proj", "nope_proj"]))
    with pytest.raises(ValueError, match="r must be"):
        apply_lora(_load(), LoraConfig(r=0))
    with pytest.raises(ValueError, match="all-linear"):
        apply_lora(_load(), LoraConfig(target_modules="attention"))
    with pytest.raises(ValueError, match="LlamaModel"):
        apply_lora(_load().model, LoraConfig())
    with pytest.raises(ValueError, match="classifier head"):
        apply_lora(_load(AutoModelForTokenClassification, num_labels=1), LoraConfig(target_modules=["score"]))


def test_critic_and_reward_model(tmp_path):
    critic = _load(AutoModelForTokenClassification, num_labels=1)
    pristine = copy.deepcopy(critic).eval()
    policy = apply_lora(critic, LoraConfig(r=4))
    base = policy.get_base_model()
    assert {n for n, p in base.named_parameters() if p.requires_grad and "lora_" not in n} == {
        "score.modules_to_save.default.weight",
        "score.modules_to_save.default.bias",
    }
    assert not hasattr(base.score, "lora_A")  # the head trains in full, it is not adapted
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        value_forward(policy, *_batch()).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert torch.equal(
            value_forward(reference_view(policy), *_batch(1)), value_forward(pristine, *_batch(1))
        )
        expected = value_forward(policy.eval(), *_batch(1))
    export_lora(policy, tmp_path, "merged")
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        atol = model_atol(expected, reloaded.config)  # merged vs two-step adapter sums: float32 rounding
        assert torch.allclose(value_forward(reloaded, *_batch(1)), expected, atol=atol)

    reward_model = _load(AutoModelForSequenceClassification, num_labels=1)
    reward_model.config.pad_token_id = 0
    pristine = copy.deepcopy(reward_model).eval()
    ref = reference_view(apply_lora(reward_model, LoraConfig(r=4)))
    ids, mask = _batch()[:2]
    with torch.no_grad():
        assert torch.equal(sequence_scores(ref, ids, mask), sequence_scores(pristine, ids, mask))
