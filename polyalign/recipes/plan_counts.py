"""Counting for the memory planner (`polyalign.recipes.plan`): parameters and bytes of a model built from its config
on the meta device (no weights read or allocated), and the per-token activation, logits and KV-cache
formulas of a Llama-style decoder. Formulas and measured checks: docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyalign.config import LoraConfig
from polyalign.logprobs import HEAD_CHUNK_ROWS
from polyalign.models import DTYPES, ScoreModel, resolve_model_path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_STEP_BYTES = 4
"""Fused AdamW keeps `step` as a float32 scalar tensor per parameter tensor."""
_HEADS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence": "AutoModelForSequenceClassification",
}


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the activation and KV-cache formulas need (read from the model config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class Count:
    params: int
    trainable: int
    weight_bytes: int
    trainable_bytes: int
    trainable_tensors: int
    largest_unit_bytes: int
    """Weights + gradients of the largest FSDP unit (decoder layer, or what the root holds)."""
    shape: Shape


# ---------------------------------------------------------------- counting parameters on the meta device


def _shape(config) -> Shape:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = c.hidden_size, c.num_attention_heads
    intermediate = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    return Shape(
        layers=c.num_hidden_layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or hidden // heads,
        vocab=c.vocab_size,
    )


def _meta_model(source: str, head: str, dtype: str, lora: LoraConfig | None):
    import transformers

    path = resolve_model_path(source)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot read the config of model {source!r}: {e} (a hub id needs network access or a local cache)"
        ) from e
    if head != "causal_lm":
        config.num_labels = 1
    with torch.device("meta"):
        if (
            head == "sequence"
            and type(config) not in transformers.AutoModelForSequenceClassification._model_mapping
        ):
            model = ScoreModel(config).to(DTYPES[dtype])  # what models.load_score_model builds then
        else:
            model = getattr(transformers, _HEADS[head]).from_config(config, dtype=DTYPES[dtype])
    if lora is not None:  # the same wrapping a run applies (a classifier's fresh head trains in full)
        from polyalign.lora import apply_lora

        model = apply_lora(model, lora)
    return model, _shape(config)


def count_model(
    source: str, head: str = "causal_lm", dtype: str = "float32", lora: LoraConfig | None = None, trains=True
) -> Count:
    """Parameters and bytes of a model built from its config on the meta device.

    head: causal_lm (policy, reference) | sequence (reward model or PPO value model, num_labels=1).
    trains=False counts a frozen model (no trainable parameters); with `lora`, only the adapter trains.
    """
    model, shape = _meta_model(source, head, dtype, lora)
    params = list(model.parameters())
    trainable = [p for p in params if trains and p.requires_grad]

    def nbytes(tensors, with_grads: bool) -> int:
        return sum(
            p.numel() * p.element_size() * (2 if with_grads and p.requires_grad else 1) for p in tensors
        )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    units = [nbytes(m.parameters(), trains) for m in base.modules() if type(m).__name__ in names]
    root = nbytes(params, trains) - sum(units)
    return Count(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weight_bytes=nbytes(params, False),
        trainable_bytes=nbytes(trainable, False),
        trainable_tensors=len(trainable),
        largest_unit_bytes=max([root, *units]),
        shape=shape,
    )


# ---------------------------------------------------------------- activations, logits, KV cache


def layer_activation_bytes(shape: Shape, dtype_bytes: int) -> int:
    """Bytes one Llama-style decoder layer keeps for backward, per token (b = dtype bytes, h hidden,
    i intermediate, a heads, kv key/value heads, d head_dim):

        2 * (4h + 2bh + 4)          two RMSNorms: float32 input, normalised and output copies, float32 rsqrt
      + b * (2ad + 2kv*d + 4i)      q and the attention output; k and v; MLP gate, silu(gate), up, product
      + 4a                          float32 log-sum-exp per head (sdpa / flash attention)

    Eager attention would add the (a, seq, seq) attention probabilities; that term is not counted.
    """
    s, b = shape, dtype_bytes
    norms = 2 * (4 * s.hidden + 2 * b * s.hidden + 4)
    return (
        norms
        + b * (2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate)
        + 4 * s.heads
    )


def activation_bytes(
    shape: Shape,
    rows: int,
    seq: int,
    completion_tokens: int,
    dtype_bytes: int,
    checkpointing: bool,
    lm_head: bool,
) -> tuple[int, int]:
    """(activations, logits) bytes one training forward keeps for backward.

    activations = layers * tokens * layer_activation_bytes                       (no checkpointing)
                = layers * tokens * b*h + tokens * layer_activation_bytes        (checkpointing: layer
                  inputs, plus one layer recomputed during backward)
                + tokens * (4h + 2bh + 4 + 2bd)   final norm, rotary cos/sin
                + N * b*h                         head input; N = rows * completion_tokens
    logits      = N * V * 4                        float32 softmax kept by the selective log-softmax
                + C * V * (b + 4 [if b < 4])       one head chunk's logits (C = min(rows, HEAD_CHUNK_ROWS) * T)
    with tokens = rows * seq. A value / classifier head (lm_head=False) keeps no logits.
    """
    s, b = shape, dtype_bytes
    tokens, n = rows * seq, rows * completion_tokens
    layer = layer_activation_bytes(s, b)
    if checkpointing:
        layers = s.layers * tokens * b * s.hidden + tokens * layer
    else:
        layers = s.layers * tokens * layer
    outside = tokens * (4 * s.hidden + 2 * b * s.hidden + 4 + 2 * b * s.head_dim) + n * b * s.hidden
    logits = 0
    if lm_head:
        chunk = min(rows, HEAD_CHUNK_ROWS) * completion_tokens
        logits = n * s.vocab * 4 + chunk * s.vocab * (b + (4 if b < 4 else 0))
    return layers + outside, logits


def kv_cache_bytes(shape: Shape, rows: int, seq: int, dtype_bytes: int) -> int:
    """rows * seq * layers * 2 (k and v) * kv_heads * head_dim * b: the HF engine's cache for one rollout."""
    return rows * seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * dtype_bytes
