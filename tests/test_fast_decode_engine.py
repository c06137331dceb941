"""HFEngine on every family: the fast path is chosen for the families `fast_decode` covers and the HF forward
for the rest (phi3, olmo2, gpt2); greedy rollouts equal `model.generate(do_sample=False)` token for token on
either path, and fast and HF-path rollouts are equal token for token, greedy and sampled with a seed."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from polyalign.rollout.fast_decode import unsupported_reason
from polyalign.rollout.hf import HFEngine, _CachedRunner, _FastRunner
from polyalign.types import Sampling
from tests.test_fast_decode import _random
from tests.test_fast_decode_families import WIDE, family_models

PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily"]


def hf_path_models() -> dict:
    gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=128, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return {
        "phi3": lambda: _random(Phi3ForCausalLM, Phi3Config(**WIDE)),
        "olmo2": lambda: _random(Olmo2ForCausalLM, Olmo2Config(**WIDE)),
        "gpt2": lambda: _random(GPT2LMHeadModel, gpt2),
    }


FAST, SLOW = list(family_models()), list(hf_path_models())


def build(name: str):
    return {**family_models(), **hf_path_models()}[name]()


def hf_greedy(model, tokenizer, max_new_tokens: int) -> list[list[int]]:
    """model.generate on the left-padded batch, each row cut after its first EOS."""
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    rows = out[:, inputs.input_ids.shape[1] :].tolist()
    eos = model.config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.mark.parametrize("name", FAST + SLOW)
def test_greedy_rollouts_equal_hf_generate(stories, name):
    model, tokenizer = build(name), stories[1]
    engine = HFEngine(model, tokenizer)
    runner = _FastRunner if name in FAST else _CachedRunner
    assert isinstance(engine._runner(3, 32), runner)
    reason = unsupported_reason(model, 32)
    assert reason is None if name in FAST else reason.startswith(f"model_type {name!r}: "), reason
    r = engine.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=12, temperature=0.0))
    got = [row[:length] for row, length in zip(r.completion_ids.tolist(), r.completion_mask.sum(1).tolist())]
    assert got == hf_greedy(model, tokenizer, 12)


SAMPLINGS = [
    Sampling(max_new_tokens=12, temperature=0.0),
    Sampling(max_new_tokens=12, temperature=1.0, seed=3),
]
# Families whose ForCausalLM forward maps the logits after the head (gemma's final_logit_softcapping, cohere's
# logit_scale): both paths apply the map (`logprobs.logits_head` on the HF path), checked with and without it.
WITH_FINAL_TRANSFORM = {"gemma2", "gemma3", "cohere"}


def without_final_transform(model):
    """The same model with the logit map after the head switched off (softcap None, logit_scale 1)."""
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        model.config.final_logit_softcapping = None
    if hasattr(model, "logit_scale"):
        model.config.logit_scale = model.logit_scale = 1.0
    return model


def _engine_cases():
    for name in FAST:
        yield pytest.param(name, False, id=name)
        if name in WITH_FINAL_TRANSFORM:
            yield pytest.param(name, True, id=f"{name}-no-final-transform")


@pytest.mark.parametrize("name, plain", list(_engine_cases()))
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_fast_and_hf_path_rollouts_are_equal(stories, name, plain, sampling):
    model, tokenizer = build(name), stories[1]
    if plain:
        model = without_final_transform(model)
    fast = HFEngine(model, tokenizer, fast_decode=True).generate(PROMPTS, n=2, sampling=sampling)
    slow = HFEngine(model, tokenizer, fast_decode=False).generate(PROMPTS, n=2, sampling=sampling)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAST)
def test_fast_rollout_logprobs_equal_the_hf_forward(stories, name):
    """The sampler's log-probs on the fast path are those of HF's full forward (ForCausalLM.forward, with
    every map after the head) on the prompt + completion, within 1e-5."""
    model, tokenizer = build(name), stories[1]
    r = HFEngine(model, tokenizer, fast_decode=True).generate(PROMPTS, n=2, sampling=SAMPLINGS[1])
    ids = torch.cat((r.prompt_ids, r.completion_ids), 1)
    mask = torch.cat((r.prompt_mask, r.completion_mask), 1)
    with torch.inference_mode():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
    width = r.prompt_ids.shape[1]
    logprobs = logits[:, width - 1 : -1].log_softmax(-1).gather(-1, r.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(r.logprobs, logprobs * r.completion_mask, atol=1e-5, rtol=0)
