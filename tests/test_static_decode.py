"""The static-shape decode loop (`rollout.static_decode`, the form captured as a CUDA graph on GPU) run eagerly
on CPU: the same tokens, masks and finished flags as the dynamic loop, and log-probs within `model_atol`,
for every family the fast path runs, greedy and sampled, with rows finishing at EOS; stop strings and the
HF path keep the dynamic loop; weight changes between generate() calls are seen."""

from __future__ import annotations

import pytest
import torch

from polyalign.rollout import static_decode
from polyalign.rollout.hf import HFEngine
from polyalign.types import Sampling
from tests.conftest import model_atol
from tests.test_fast_decode_families import family_models

PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily"]
SAMPLINGS = [
    Sampling(max_new_tokens=20, temperature=1.0, seed=3),
    Sampling(max_new_tokens=20, temperature=0.7, top_k=30, top_p=0.9, seed=4),
    Sampling(max_new_tokens=12, temperature=0.0),
]


def assert_same_rollouts(static, dynamic, config) -> None:
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    assert torch.equal(static.completion_mask, dynamic.completion_mask)
    assert torch.equal(static.finished, dynamic.finished) and static.completions == dynamic.completions
    torch.testing.assert_close(
        static.logprobs, dynamic.logprobs, atol=model_atol(dynamic.logprobs, config), rtol=0
    )


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_static_equals_dynamic_on_stories(stories, sampling):
    static = HFEngine(*stories, static_decode=True).generate(PROMPTS, n=3, sampling=sampling)
    dynamic = HFEngine(*stories, static_decode=False).generate(PROMPTS, n=3, sampling=sampling)
    assert_same_rollouts(static, dynamic, stories[0].config)


@pytest.mark.parametrize("name", list(family_models()))
def test_static_equals_dynamic_for_every_family(stories, name):
    model, sampling = family_models()[name](), Sampling(max_new_tokens=10, seed=1)
    static = HFEngine(model, stories[1], static_decode=True).generate(PROMPTS, n=2, sampling=sampling)
    dynamic = HFEngine(model, stories[1], static_decode=False).generate(PROMPTS, n=2, sampling=sampling)
    assert_same_rollouts(static, dynamic, model.config)


def test_rows_finishing_at_eos_keep_decoding_padding(stories, tiny_llama, monkeypatch):
    tiny_llama.generation_config.eos_token_id = None
    sampling = Sampling(max_new_tokens=20, seed=5)
    free = HFEngine(tiny_llama, stories[1]).generate(["Hi there", "A cat"], n=3, sampling=sampling)
    tiny_llama.config.eos_token_id = int(free.completion_ids.flatten().mode().values)
    monkeypatch.setattr(static_decode, "CHECK_EVERY", 3)  # the early stop when all rows finished is checked
    static = HFEngine(tiny_llama, stories[1], static_decode=True).generate(["Hi there", "A cat"], 3, sampling)
    dynamic = HFEngine(tiny_llama, stories[1], static_decode=False).generate(
        ["Hi there", "A cat"], 3, sampling
    )
    assert static.finished.any() and not static.finished.all()
    assert_same_rollouts(static, dynamic, tiny_llama.config)


def test_stop_strings_and_default_stay_dynamic(stories, monkeypatch):
    calls = []
    monkeypatch.setattr(static_decode, "decode_static", lambda *a: calls.append(a) or 1 / 0)
    stop = Sampling(max_new_tokens=8, seed=0, stop_strings=(".",))
    HFEngine(*stories, static_decode=True).generate(PROMPTS, 2, stop)
    HFEngine(*stories).generate(PROMPTS, 2, Sampling(max_new_tokens=8, seed=0))  # CPU default: dynamic
    monkeypatch.setenv("POLYALIGN_STATIC_DECODE", "1")
    with pytest.raises(ZeroDivisionError):
        HFEngine(*stories).generate(PROMPTS, 2, Sampling(max_new_tokens=8, seed=0))
    assert len(calls) == 1


@pytest.mark.parametrize("static", [False, True])
def test_weight_change_between_generate_calls_is_seen(stories, tiny_llama, static):
    """The decoder reads the model's own weights at every call: an optimizer step in between is seen."""
    engine, sampling = (
        HFEngine(tiny_llama, stories[1], static_decode=static),
        Sampling(max_new_tokens=6, seed=2),
    )
    before = engine.generate(PROMPTS, 2, sampling)
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.k_proj.weight.mul_(-2.0)
        tiny_llama.model.layers[1].mlp.up_proj.weight.mul_(3.0)
    after = engine.generate(PROMPTS, 2, sampling)
    reference = HFEngine(tiny_llama, stories[1], fast_decode=False).generate(PROMPTS, 2, sampling)
    assert (after.logprobs - before.logprobs).abs().max() > 1e-3
    assert_same_rollouts(after, reference, tiny_llama.config)


def test_capture_and_replay_logic_with_a_stand_in_graph(stories, monkeypatch):
    """What a CUDA graph assumes, checked on CPU: the step survives warm-up runs (it is idempotent) and its
    outputs are the same tensors overwritten by every replay, with inputs updated in place between replays."""
    replays = []

    def stand_in(step):
        step(), step()  # warm-up on the first step's inputs
        outputs = step()  # "capture"

        def replay():
            replays.append(1)
            for out, new in zip(outputs, step()):
                out.copy_(new)
            return outputs

        return replay

    real = static_decode.decode_static
    monkeypatch.setattr(static_decode, "decode_static", lambda *args: real(*args[:-1], True))
    monkeypatch.setattr(static_decode, "graphed", stand_in)
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=9)
    graph = HFEngine(*stories, static_decode=True).generate(PROMPTS, n=2, sampling=sampling)
    dynamic = HFEngine(*stories, static_decode=False).generate(PROMPTS, n=2, sampling=sampling)
    assert len(replays) == 11
    assert_same_rollouts(graph, dynamic, stories[0].config)
