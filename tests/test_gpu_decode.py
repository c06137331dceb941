"""GPU: the CUDA-graph decode (`rollout.static_decode`, captured and replayed) gives the same tokens as the
eager decode on the same GPU, in float32 and bfloat16, and log-probs close to them; the graph path is the
default on CUDA. Skipped without CUDA (the same static loop is checked on CPU in test_static_decode.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from polyalign.rollout import static_decode
from polyalign.rollout.hf import HFEngine
from polyalign.types import Sampling

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
PROMPTS = ["Once upon a time, there was a little dog", "Lily went to the park", "The sun was"]
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
# Tolerance of per-token log-probs between runs of the same maths on the same GPU (kernels may differ).
LOGPROB_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def model(family: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    return model_class(config_class(**SHAPE)).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graph_decode_equals_eager_decode(stories, family, dtype, temperature, monkeypatch):
    """Graph replay vs the same static step run eagerly (same kernels, same shapes): the same tokens. In
    float32 also the dynamic loop (rows dropped as they finish) gives the same tokens."""
    policy, tokenizer = model(family, dtype), stories[1]
    sampling = Sampling(max_new_tokens=24, temperature=temperature, seed=7)
    captures, graphed = [], static_decode.graphed
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")  # no silent eager fallback
        patch.setattr(static_decode, "graphed", lambda step: captures.append(1) or graphed(step))
        graph = HFEngine(policy, tokenizer).generate(PROMPTS, n=4, sampling=sampling)
    assert captures == [1]  # the default on CUDA: static shapes, one capture per generate()
    with monkeypatch.context() as patch:
        patch.setattr(static_decode, "graphed", lambda step: step)
        eager = HFEngine(policy, tokenizer).generate(PROMPTS, n=4, sampling=sampling)
    others = [eager]
    if dtype == torch.float32:
        others.append(
            HFEngine(policy, tokenizer, static_decode=False).generate(PROMPTS, n=4, sampling=sampling)
        )
    for other in others:
        assert torch.equal(graph.completion_ids, other.completion_ids)
        assert torch.equal(graph.completion_mask, other.completion_mask)
        torch.testing.assert_close(graph.logprobs, other.logprobs, atol=LOGPROB_ATOL[dtype], rtol=0)


def test_graph_is_replayed_with_new_weights(stories):
    policy, tokenizer = model("llama", torch.float32), stories[1]
    engine, sampling = HFEngine(policy, tokenizer), Sampling(max_new_tokens=12, seed=1)
    before = engine.generate(PROMPTS, 2, sampling)
    with torch.no_grad():
        policy.model.layers[0].mlp.up_proj.weight.mul_(4.0)
    after = engine.generate(PROMPTS, 2, sampling)
    eager = HFEngine(policy, tokenizer, static_decode=False).generate(PROMPTS, 2, sampling)
    assert (after.logprobs - before.logprobs).abs().max() > 1e-3
    torch.testing.assert_close(after.logprobs, eager.logprobs, atol=1e-4, rtol=0)
