"""Which transformers model families the fast decode path (`fast_decode.FastDecoder`) runs, described as data.

Each supported `model_type` maps to a `Family`: the norm it uses, its residual layout, where its scalings live
in the config, and a function that finds a decoder layer's modules (`Block`, uniform names). The decoder reads
only these descriptions, never `model_type`, so a new family is one table row when its maths is already
covered. The maths of every kind is written out in `fast_decode`.

`unsupported_reason` names what keeps a model on the HF forward: another family, a module the fast path does
not know (adapters, quantization), a rope type whose angles change with the sequence, a sliding window
shorter than the sequence, bidirectional attention. This module must not know about engines or sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import nn

STATIC_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class Block:
    """The modules of one decoder layer under uniform names (references to the model's own modules, so an
    optimizer step is seen at the next call). None marks a module the family does not have."""

    attn_norm: nn.Module  # the norm before attention (and before the MLP too when `mlp_norm` is None)
    o: nn.Linear  # attention output projection
    down: nn.Linear  # MLP output projection
    up: nn.Linear  # MLP input projection (the "up" of a gated MLP)
    gate: nn.Linear | None = None  # gated MLP: down(act(gate h) * up h); else down(act(up h))
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None  # fused, per head [q | k | v] (gpt-neox) instead of q, k, v
    q_norm: nn.Module | None = None  # per-head norm of queries / keys, before rope (qwen3, gemma3, cohere)
    k_norm: nn.Module | None = None
    attn_out_norm: nn.Module | None = None  # norm of the attention output before its residual add (gemma)
    mlp_norm: nn.Module | None = None  # the norm before the MLP; None: the MLP reads attn_norm's output
    mlp_out_norm: nn.Module | None = None  # norm of the MLP output before its residual add (gemma)

    def linears(self) -> list[nn.Module]:
        modules = [getattr(self, f.name) for f in fields(self) if f.name in LINEARS]
        return [m for m in modules if m is not None]


LINEARS = ("o", "down", "up", "gate", "q", "k", "v", "qkv")


@dataclass(frozen=True)
class Family:
    """How one family computes a layer; see `fast_decode` for the maths of each kind."""

    block: Callable[[nn.Module], Block]  # decoder layer -> its modules
    norm: str = "rms"  # "rms" | "rms_plus_one" (gemma) | "layer" (nn.LayerNorm) | "layer_fp32" (cohere)
    parallel: Callable[[object], bool] = lambda config: False  # x + attn + mlp, both from x (not sequential)
    rope_pairs: str = "halves"  # rotated pairs (x_i, x_{i+d/2}) "halves", or (x_2i, x_2i+1) "adjacent"
    rope_per_layer_type: bool = False  # rope parameters per config.layer_types entry (gemma3)
    act_key: str = "hidden_act"  # config field naming the MLP activation
    attn_scale_key: str | None = None  # config field s: attention scale s^-1/2 instead of head_dim^-1/2
    attn_softcap_key: str | None = None  # config field c: scores -> c tanh(scores / c)
    final_softcap_key: str | None = None  # config field c: logits -> c tanh(logits / c)
    logit_scale_key: str | None = None  # config field s: logits -> s logits
    final_norm: str = "norm"  # attribute of the backbone holding the final norm


def _attn_mlp(layer: nn.Module, **norms) -> Block:
    """A layer with self_attn.{q,k,v,o}_proj (+ q_norm, k_norm) and mlp.{gate,up,down}_proj."""
    attn, mlp = layer.self_attn, layer.mlp
    qk_norms = dict(q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
    return Block(
        q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
        gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj, **qk_norms, **norms,
    )  # fmt: skip


def _llama_block(layer: nn.Module) -> Block:
    return _attn_mlp(layer, attn_norm=layer.input_layernorm, mlp_norm=layer.post_attention_layernorm)


def _gemma_block(layer: nn.Module) -> Block:
    return _attn_mlp(
        layer,
        attn_norm=layer.input_layernorm,
        attn_out_norm=layer.post_attention_layernorm,
        mlp_norm=layer.pre_feedforward_layernorm,
        mlp_out_norm=layer.post_feedforward_layernorm,
    )


def _cohere_block(layer: nn.Module) -> Block:
    return _attn_mlp(layer, attn_norm=layer.input_layernorm)  # one norm feeds attention and MLP


def _neox_block(layer: nn.Module) -> Block:
    attn, mlp = layer.attention, layer.mlp
    return Block(
        attn_norm=layer.input_layernorm, qkv=attn.query_key_value, o=attn.dense,
        mlp_norm=layer.post_attention_layernorm, up=mlp.dense_h_to_4h, down=mlp.dense_4h_to_h,
    )  # fmt: skip


_LLAMA = Family(block=_llama_block)
_GEMMA = dict(
    block=_gemma_block,
    norm="rms_plus_one",
    act_key="hidden_activation",
    attn_scale_key="query_pre_attn_scalar",
    final_softcap_key="final_logit_softcapping",
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q_norm / k_norm found by the block
    "gemma2": Family(**_GEMMA, attn_softcap_key="attn_logit_softcapping"),
    # gemma3's attention never applies config.attn_logit_softcapping (HF passes no softcap to it).
    "gemma3_text": Family(**_GEMMA, rope_per_layer_type=True),
    "cohere": Family(
        block=_cohere_block,
        norm="layer_fp32",
        parallel=lambda config: True,
        rope_pairs="adjacent",
        logit_scale_key="logit_scale",
    ),
    "gpt_neox": Family(
        block=_neox_block,
        norm="layer",
        parallel=lambda config: config.use_parallel_residual,
        final_norm="final_layer_norm",
    ),
}


# Families that stay on the HF forward, with what their layers do that no `Family` above describes.
NOT_DESCRIBED = {
    "gpt2": "learned absolute positions and Conv1D projections",
    "phi3": "fused qkv_proj and gate_up_proj, longrope scaling",
    "olmo2": "q/k norms over all heads' features and no norm before attention or MLP",
    "gemma3": "multimodal (Gemma3ForConditionalGeneration); its text model gemma3_text is covered",
}


def rope_parameters(config, family: Family) -> dict[str | None, dict]:
    """Rope parameters by layer type (one entry, key None, unless the family has them per layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if family.rope_per_layer_type:
        return {kind: params[kind] or {} for kind in set(config.layer_types)}
    return {None: params}


def _config_reason(config, family: Family, max_len: int) -> str | None:
    act = getattr(config, family.act_key, None)
    if act not in ACTIVATIONS:
        return f"activation {act!r} not in {ACTIVATIONS}"
    for params in rope_parameters(config, family).values():
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in STATIC_ROPE_TYPES:
            return f"rope type {kind!r} not in {STATIC_ROPE_TYPES}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if window is not None and (kinds is None or "sliding_attention" in kinds) and window < max_len:
        return f"sliding window {window} < sequence length {max_len}"
    return None


def unsupported_reason(model: nn.Module, max_len: int) -> str | None:
    """Why the fast path cannot run `model` for sequences of `max_len` tokens, or None when it can."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        why = NOT_DESCRIBED.get(config.model_type, f"not in {tuple(FAMILIES)}")
        return f"model_type {config.model_type!r}: {why}"
    reason = _config_reason(config, family, max_len)
    if reason is not None:
        return reason
    backbone, head = model.base_model, model.get_output_embeddings()
    if not hasattr(backbone, "layers") or not hasattr(backbone, family.final_norm) or head is None:
        return f"not a {config.model_type} causal LM with .layers, .{family.final_norm} and an output head"
    for layer in backbone.layers:
        try:
            block = family.block(layer)
        except AttributeError as error:
            return f"a decoder layer lacks a module the {config.model_type} family has: {error}"
        if any(type(m) is not nn.Linear for m in block.linears()):  # PEFT / quantized layers hold extra maths
            return "projection layers are not plain nn.Linear (adapters or quantization)"
    if type(head) is not nn.Linear:
        return "output head is not a plain nn.Linear"
    return None
