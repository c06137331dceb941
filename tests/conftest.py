"""Shared test fixtures: the shipped stories260K model, a random tiny Llama, and fixed seeds."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from polyalign.models import load_policy

# The tests use tiny models: one intra-op thread is as fast, and on a shared CPU it avoids OpenMP workers
# waiting on descheduled siblings (measured here: 10-20x slower small ops with 2 threads under load).
torch.set_num_threads(1)


FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one unit of float32 rounding, relative


def fp32_atol(reference: torch.Tensor, reduction: int, depth: int = 1, ulps: float = 4.0) -> float:
    """Absolute tolerance for two float32 computations of the same values that differ only in summation
    order (other kernels, other batch shapes, another CPU's vector width).

    Why this size: a dot product of `reduction` terms rounds with an error that grows like
    eps * sqrt(reduction) times the size of its terms (rounding errors add as a random walk); a network
    compounds `depth` such layers, and the errors land on values of the size of the largest reference value.
    `ulps` is the safety factor. A real bug (a wrong mask, rope or weight) moves values by orders of
    magnitude more, so the comparison still has teeth.
    """
    scale = float(reference.detach().abs().max())
    return ulps * FP32_EPS * math.sqrt(reduction) * depth * scale


def model_atol(reference: torch.Tensor, config) -> float:
    """`fp32_atol` for logits or log-probs of a transformer: the longest reduction is the MLP's (the
    log-softmax adds less than one rounding), compounded over its layers."""
    reduction = max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)
    return fp32_atol(reference, reduction, depth=config.num_hidden_layers)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama config, hidden 32, vocab 512 (the stories260K tokenizer fits it)."""
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same global RNG state."""
    random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the shipped 260K-parameter TinyStories Llama, in eval mode, float32."""
    model, tokenizer = load_policy("stories260K")
    return model.eval(), tokenizer


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 32, vocab 512) initialised from a fixed seed, in eval mode."""
    torch.manual_seed(1234)
    return LlamaForCausalLM(tiny_llama_config()).eval()
