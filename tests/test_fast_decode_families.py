"""fast_decode beyond Llama: for qwen3, gemma2, gemma3 (text), cohere and gpt-neox, the prefill logits and
every decode step's logits equal the HF forward (left padding, GQA where the family has it) within
`model_atol` and within 1e-5 absolute in float32 (the engine-level checks are in test_fast_decode_engine.py).

Each tiny model is random with non-trivial norm weights and biases (`_random`), and has every option of its
family switched on where the family has one: qwen3 q/k norms and attention biases with head_dim != H / heads;
gemma2 query_pre_attn_scalar, attention and final soft-capping small enough to bend the values, sliding
windows exactly as long as the sequence (32 tokens); gemma3 local and global rope bases (linear scaling on the global one) and
q/k norms; cohere q/k norms, logit_scale; gpt-neox partial rotary, parallel and sequential residuals."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from polyalign.rollout import fast_decode
from tests.conftest import model_atol
from tests.test_fast_decode import SMALL, _batch, _random

MAX_LEN = 32
WIDE = dict(SMALL, initializer_range=0.2)  # weights large enough for attention scores and logits of O(1)
GEMMA = dict(WIDE, head_dim=16, query_pre_attn_scalar=12, final_logit_softcapping=2.0, sliding_window=MAX_LEN)


def family_models() -> dict:
    """name -> a random tiny model of each newly supported family (built on call: ~50 ms each)."""
    neox = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=512, max_position_embeddings=128, rotary_pct=0.5, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, initializer_range=0.2)  # fmt: skip
    gemma3_rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
    }
    return {
        "qwen3": lambda: _random(Qwen3ForCausalLM, Qwen3Config(**WIDE, head_dim=16, attention_bias=True)),
        "gemma2": lambda: _random(Gemma2ForCausalLM, Gemma2Config(**GEMMA, attn_logit_softcapping=1.0)),
        "gemma3": lambda: _random(
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                **GEMMA, layer_types=["sliding_attention", "full_attention"], rope_parameters=gemma3_rope
            ),
        ),
        "cohere": lambda: _random(CohereForCausalLM, CohereConfig(**WIDE, use_qk_norm=True, logit_scale=0.5)),
        "gpt_neox-parallel": lambda: _random(GPTNeoXForCausalLM, GPTNeoXConfig(**neox)),
        "gpt_neox-sequential": lambda: _random(
            GPTNeoXForCausalLM, GPTNeoXConfig(**neox, use_parallel_residual=False)
        ),
    }


FAMILIES = list(family_models())  # model_type gemma3_text is "gemma3" here


def max_error(model, mutate=lambda fast: None) -> tuple[float, float, float]:
    """(max |fast - HF| over the prefill and every decode step, model_atol, max |HF logit|); `mutate` may
    break the fast decoder before it runs."""
    ids, mask, positions = _batch(
        model.config.vocab_size, width=MAX_LEN
    )  # gemma: the sequence spans the window
    prefill, errors = 8, []
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
        fast = fast_decode.FastDecoder(model, rows=ids.shape[0], max_len=MAX_LEN)
        mutate(fast)
        got = fast.forward(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill])
        errors.append((got - expected[:, prefill - 1]).abs().max())
        for t in range(prefill, ids.shape[1]):
            got = fast.forward(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1])
            errors.append((got - expected[:, t]).abs().max())
    return float(max(errors)), model_atol(expected, model.config), float(expected.abs().max())


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_hf_prefill_and_each_decode_step(name):
    model = family_models()[name]()
    assert fast_decode.unsupported_reason(model, MAX_LEN) is None
    error, atol, scale = max_error(model)
    print(f"{name}: max |fast - HF| = {error:.2e} (model_atol {atol:.2e}, max |logit| {scale:.2f})")
    assert error <= min(atol, 1e-5)
    assert scale > 1  # the comparison is not between two near-zero tensors


def _drop_qk_norms(fast):
    for block in fast.blocks:
        block.q_norm = block.k_norm = None


def _weight_not_one_plus_weight(x, norm):
    return torch.nn.functional.rms_norm(x, x.shape[-1:], norm.weight, norm.eps)


def _one_rope_table(fast):
    fast.layer_rope = [fast.layer_rope[0]] * len(fast.layer_rope)


MUTATIONS = {  # family -> (what a fast path could get wrong, the mistake)
    "qwen3": [("q/k norms", _drop_qk_norms)],
    "gemma2": [
        ("attention soft-capping", lambda fast: setattr(fast, "attn_softcap", None)),
        ("final soft-capping", lambda fast: setattr(fast, "final_softcap", None)),
        ("query_pre_attn_scalar", lambda fast: setattr(fast, "scale", fast.head_dim**-0.5)),
        ("(1 + w) norms", lambda fast: setattr(fast, "norm", _weight_not_one_plus_weight)),
    ],
    "gemma3": [("q/k norms", _drop_qk_norms), ("local vs global rope", _one_rope_table)],
    "cohere": [
        ("logit_scale", lambda fast: setattr(fast, "logit_scale", None)),
        ("adjacent rope pairs", lambda fast: setattr(fast, "adjacent", False)),
        ("q/k norms", _drop_qk_norms),
    ],
    "gpt_neox-parallel": [("parallel residual", lambda fast: setattr(fast, "parallel", False))],
}


@pytest.mark.parametrize(
    "name, what", [(name, what) for name, cases in MUTATIONS.items() for what, _ in cases]
)
def test_each_family_detail_is_live(name, what):
    """The equality test has teeth: leaving out any one of a family's details moves the logits far past
    the tolerance, so a fast path that ignored it would fail."""
    mutate = dict(MUTATIONS[name])[what]
    error, atol, _ = max_error(family_models()[name](), mutate)
    assert error > 100 * atol, (name, what, error)


def test_unsupported_family_options_are_named():
    windowed = Gemma2ForCausalLM(Gemma2Config(**{**GEMMA, "sliding_window": 8}))
    assert "sliding window 8" in fast_decode.unsupported_reason(windowed, 16)
    bidirectional = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA, use_bidirectional_attention=True))
    assert "bidirectional" in fast_decode.unsupported_reason(bidirectional, 16)
    dynamic = Qwen3ForCausalLM(
        Qwen3Config(**SMALL, head_dim=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    )
    assert "rope type 'dynamic'" in fast_decode.unsupported_reason(dynamic, 16)
