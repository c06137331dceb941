"""fast_llama (= fast_decode.FastDecoder): its logits equal the HF model's (prefill and every decode step,
left padding, GQA, tied and untied heads, qwen2 biases, llama with o_proj and MLP biases, mistral), it sees
weight updates at once, and HFEngine gives the same rollouts on the fast and the HF paths and falls back to
HF for models the fast path does not cover.
Tolerance: `model_atol` (tests/conftest.py): both paths are float32 computations of the same maths that
differ in summation order (one full-sequence forward vs token-by-token decoding, other kernels), so they may
differ by float32 rounding compounded over the layers' reductions, on the scale of the largest logit."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from polyalign.rollout import fast_llama
from polyalign.rollout.hf import HFEngine, _CachedRunner, _FastRunner
from polyalign.types import Sampling
from tests.conftest import model_atol, tiny_llama_config

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)  # fmt: skip


def _random(cls, config):
    torch.manual_seed(7)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so that they are really exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def models(stories):
    return {
        "stories260K": stories[0],
        "llama-untied": _random(type(stories[0]), tiny_llama_config()),
        "llama-tied-mha": _random(
            type(stories[0]), tiny_llama_config(tie_word_embeddings=True, num_key_value_heads=4)
        ),
        "llama-all-biases": _random(type(stories[0]), tiny_llama_config(attention_bias=True, mlp_bias=True)),
        "qwen2-bias": _random(Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=True)),
        "mistral": _random(MistralForCausalLM, MistralConfig(**SMALL, sliding_window=None)),
    }


def _batch(vocab: int, rows: int = 4, width: int = 14):
    """Random ids with left padding of different lengths (row 1 unpadded)."""
    ids = torch.randint(3, vocab, (rows, width))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([5, 0, 2, 7][:rows]):
        mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize(
    "name", ["stories260K", "llama-untied", "llama-tied-mha", "llama-all-biases", "qwen2-bias", "mistral"]
)
def test_logits_equal_hf_prefill_and_each_decode_step(stories, name):
    model = models(stories)[name]
    assert fast_llama.unsupported_reason(model, 32) is None
    ids, mask, positions = _batch(model.config.vocab_size)
    prefill = 8
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
        fast = fast_llama.FastLlama(model, rows=ids.shape[0], max_len=32)
        atol = model_atol(expected, model.config)
        got = fast.forward(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill])
        torch.testing.assert_close(got, expected[:, prefill - 1], atol=atol, rtol=0)
        for t in range(prefill, ids.shape[1]):
            got = fast.forward(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1])
            torch.testing.assert_close(got, expected[:, t], atol=atol, rtol=0)
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero tensors


def test_weight_updates_are_seen_immediately(tiny_llama):
    ids, mask, positions = _batch(512)
    fast = fast_llama.FastLlama(tiny_llama, rows=4, max_len=16)
    with torch.inference_mode():
        before = fast.forward(ids, mask, positions)
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        tiny_llama.lm_head.weight.add_(0.05)
    with torch.inference_mode():
        after = fast_llama.FastLlama(tiny_llama, rows=4, max_len=16).forward(ids, mask, positions)
        expected = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=model_atol(expected, tiny_llama.config), rtol=0)


def test_select_and_repeat_keep_the_right_cache(tiny_llama):
    ids, mask, positions = _batch(512, rows=2, width=10)
    with torch.inference_mode():
        fast = fast_llama.FastLlama(tiny_llama, rows=6, max_len=16)
        fast.forward(ids[:, :9], mask[:, :9], positions[:, :9])
        fast.repeat(3, 9)  # rows 0,1,2 <- prompt 0; rows 3,4,5 <- prompt 1
        fast.select(torch.tensor([1, 4]))
        got = fast.forward(ids[:, 9:], mask, positions[:, 9:])
        expected = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=model_atol(expected, tiny_llama.config), rtol=0)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_new_tokens=20, temperature=1.0, seed=3),
        Sampling(max_new_tokens=20, temperature=0.7, top_k=30, top_p=0.9, seed=4),
        Sampling(max_new_tokens=30, temperature=0.0),
        Sampling(max_new_tokens=40, temperature=1.0, seed=5, stop_strings=(".",)),
    ],
)
def test_engine_rollouts_equal_on_both_paths(stories, sampling):
    prompts = ["Once upon a time", "The little dog ran to the", "Lily"]
    fast = HFEngine(*stories, fast_decode=True).generate(prompts, n=3, sampling=sampling)
    slow = HFEngine(*stories, fast_decode=False).generate(prompts, n=3, sampling=sampling)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    assert fast.completions == slow.completions and torch.equal(fast.finished, slow.finished)
    atol = model_atol(slow.logprobs, stories[0].config)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=atol, rtol=0)


def test_engine_rows_finishing_at_eos_match_hf_path(stories, tiny_llama):
    tiny_llama.generation_config.eos_token_id = None
    sampling = Sampling(max_new_tokens=20, seed=5)
    free = HFEngine(tiny_llama, stories[1]).generate(["Hi there", "A cat"], n=3, sampling=sampling)
    tiny_llama.config.eos_token_id = int(free.completion_ids.flatten().mode().values)
    fast = HFEngine(tiny_llama, stories[1], fast_decode=True).generate(["Hi there", "A cat"], 3, sampling)
    slow = HFEngine(tiny_llama, stories[1], fast_decode=False).generate(["Hi there", "A cat"], 3, sampling)
    assert fast.finished.any() and not fast.finished.all()
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    atol = model_atol(slow.logprobs, tiny_llama.config)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=atol, rtol=0)


def test_path_choice_and_fallback(stories, monkeypatch):
    model, tokenizer = stories
    assert isinstance(HFEngine(model, tokenizer)._runner(2, 16), _FastRunner)
    assert isinstance(HFEngine(model, tokenizer, fast_decode=False)._runner(2, 16), _CachedRunner)
    monkeypatch.setenv("POLYALIGN_FAST_DECODE", "0")
    assert isinstance(HFEngine(model, tokenizer)._runner(2, 16), _CachedRunner)
    monkeypatch.delenv("POLYALIGN_FAST_DECODE")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64)).eval()
    assert "model_type 'gpt2'" in fast_llama.unsupported_reason(gpt2, 16)
    engine = HFEngine(gpt2, tokenizer)
    assert isinstance(engine._runner(2, 16), _CachedRunner)
    r = engine.generate(["Once upon a time"], n=2, sampling=Sampling(max_new_tokens=5, seed=0))
    assert r.completion_ids.shape == (2, 5)


def test_unsupported_configs_are_named(tiny_llama):
    windowed = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8))
    assert "sliding window 8" in fast_llama.unsupported_reason(windowed, 16)
    assert fast_llama.unsupported_reason(windowed, 8) is None
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not plain nn.Linear" in fast_llama.unsupported_reason(lora.get_base_model(), 16)


def test_selective_log_softmax_value_and_gradient_match_autograd():
    from polyalign.logprobs import selective_log_softmax

    logits = (torch.randn(3, 5, 40, dtype=torch.float64) * 4).requires_grad_()
    index, weights = torch.randint(0, 40, (3, 5)), torch.randn(3, 5, dtype=torch.float64)
    got = selective_log_softmax(logits, index)
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    expected = torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]
    (expected * weights).sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, logits.grad)
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, index), (logits.detach().requires_grad_(),)
    )
    with torch.inference_mode():
        torch.testing.assert_close(selective_log_softmax(logits.detach(), index), expected.detach())


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs a torch built with MKL")
def test_mkl_packed_weights_give_the_same_logits(tiny_llama):
    """CPU float32: decode steps of the decoder's row count read MKL-packed copies of the weights; prefill
    (another row count) and a decoder without packs read the weights themselves: the same logits."""
    ids, mask, positions = _batch(512)
    with torch.inference_mode():
        packed = fast_llama.FastLlama(tiny_llama, rows=4, max_len=16)
        plain = fast_llama.FastLlama(tiny_llama, rows=4, max_len=16)
        plain.mkl = {}
        assert len(packed.mkl) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer, and the head
        for fast in (packed, plain):
            fast.forward(ids[:, :-1], mask[:, :-1], positions[:, :-1])
        got, expected = (f.forward(ids[:, -1:], mask, positions[:, -1:]) for f in (packed, plain))
    torch.testing.assert_close(got, expected, atol=model_atol(expected, tiny_llama.config), rtol=0)
