"""A lean, exact decode path for Llama-family transformers models (llama, mistral, qwen2).

Why: for small models the transformers forward spends most of a decode step in Python (mask building,
cache bookkeeping, kwargs plumbing), not in matmuls. This module runs the same maths straight on the HF
module's own parameters (no copies, so an optimizer step is visible at the next call) with a preallocated
static KV cache and `torch.nn.functional.scaled_dot_product_attention`.

The maths, per layer (x: (B, t, H), positions p, RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)):

    h = RMSNorm_in(x);  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
    q, k = rope(q, p), rope(k, p)             # rope(x) = x * cos(p) + rotate_half(x) * sin(p)
    x = x + softmax(q K^T / sqrt(d) + mask) V Wo   # K, V: the cache; GQA: g query heads share one KV head
    x = x + (silu(RMSNorm_post(x) Wgate) * (RMSNorm_post(x) Wup)) Wdown

then logits = RMSNorm_final(x[:, -1]) W_head^T. The mask allows key j for query i when key j is a real
(non-padding) token at or before i; a padding query may see itself only (its output is never read, but it
must stay finite because it is cached). GQA is computed without repeating K/V: the g query heads of a KV
head are folded into the query-length axis, (B, n_kv, g * t, d), which attends to (B, n_kv, S, d).

Anything else (PEFT-wrapped layers, biases other than qwen2's qkv, other activations or rope types, sliding
windows shorter than the sequence) is reported by `unsupported_reason` and HFEngine uses the HF forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def unsupported_reason(model: nn.Module, max_len: int) -> str | None:
    """Why the fast path cannot run `model` for sequences of `max_len` tokens, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model_type {config.model_type!r} not in {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if _rope_type(config) not in STATIC_ROPE_TYPES:
        return f"rope type {_rope_type(config)!r} not in {STATIC_ROPE_TYPES}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "layer_types", None)
    uses_window = window is not None and (sliding is None or "sliding_attention" in sliding)
    if uses_window and window < max_len:
        return f"sliding window {window} < sequence length {max_len}"
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "layers") or model.get_output_embeddings() is None:
        return "not a <Model>ForCausalLM with .model.layers and an output head"
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not nn.Linear for m in linears):  # PEFT / quantized layers hold extra maths
            return "projection layers are not plain nn.Linear (adapters or quantization)"
        if any(m.bias is not None for m in linears[3:]):
            return "o_proj or MLP projections have a bias"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "output head is not a plain nn.Linear"
    return None


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """HF's RMSNorm with `norm`'s weight and epsilon (computed in float32, as HF does)."""
    if x.dtype == torch.float32:  # one fused op instead of six
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, t, d) rotated by the angles of its positions; cos/signed_sin (B, 1, t, d).

    HF: x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]. Here [x2, x1] is a roll of x and the
    sign sits in signed_sin = [-sin1, sin2]: the same products, since negation is exact.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class FastLlama:
    """Prefill and decode with a static KV cache, reading the weights of a HF Llama-family model.

    Cache slot j holds column j of the (left-padded) token sequence, so the attention mask over all
    columns so far doubles as the key mask.
    """

    def __init__(self, model: nn.Module, rows: int, max_len: int) -> None:
        self.model = model
        backbone = model.model
        config = model.config
        self.embed, self.layers, self.norm = backbone.embed_tokens, list(backbone.layers), backbone.norm
        self.head = model.get_output_embeddings()
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        weight = self.embed.weight
        dummy = weight.new_zeros(1)
        # cos/sin of every position from the model's own rotary module (exact: elementwise per position).
        positions = torch.arange(max_len, device=weight.device)[None]
        cos, sin = backbone.rotary_emb(dummy, positions)
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)  # (max_len, d)
        shape = (len(self.layers), rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = weight.new_zeros(shape)
        self.v_cache = weight.new_zeros(shape)
        self.max_len = max_len

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the cache rows `keep` (finished rows leave the batch)."""
        self.k_cache, self.v_cache = self.k_cache[:, keep], self.v_cache[:, keep]

    def repeat_rows(self, n: int, width: int) -> None:
        """Repeat each of the first rows n times (prefill once, sample n completions)."""
        rows = self.k_cache.shape[1] // n
        for cache in (self.k_cache, self.v_cache):
            cache[:, :, :, :width] = cache[:, :rows, :, :width].repeat_interleave(n, 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed tokens ids (B, t) at `positions` (B, t); mask (B, S) covers every column so far (S = start + t).

        Writes their keys/values into cache slots [S - t, S) and returns next-token logits (B, V) of the last
        position. B may be smaller than the cache's rows (the first B rows are used).
        """
        rows, t = ids.shape
        end = mask.shape[1]
        start = end - t
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.max_len}")
        attn_mask = self._attention_mask(mask.bool(), t)  # (B, 1, g*t or 1, S)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, t, d)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, attn_mask, rows, start, end)
        return self.head(rms_norm(x[:, -1], self.norm))

    def _attention_mask(self, key_mask: torch.Tensor, t: int) -> torch.Tensor:
        """Boolean (B, 1, rows, S) mask; decode (t == 1) broadcasts one row over the query heads."""
        if t == 1:
            return key_mask[:, None, None, :]
        end = key_mask.shape[1]
        start = end - t
        query = torch.arange(start, end, device=key_mask.device)[:, None]  # (t, 1) column of each query
        causal = torch.arange(end, device=key_mask.device)[None, :] <= query  # (t, S)
        allowed = causal[None] & key_mask[:, None, :]  # (B, t, S)
        allowed |= torch.arange(end, device=key_mask.device)[None, None, :] == query  # a query sees itself
        groups = self.n_heads // self.n_kv
        return allowed[:, None].repeat(1, 1, groups, 1)  # rows ordered (group, t), like the folded queries

    def _layer(self, i, layer, x, cos, sin, attn_mask, rows, start, end) -> torch.Tensor:
        attn, mlp = layer.self_attn, layer.mlp
        batch, t, _ = x.shape
        h = rms_norm(x, layer.input_layernorm)
        q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(batch, t, self.n_heads, -1).transpose(1, 2)
        k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(batch, t, self.n_kv, -1).transpose(1, 2)
        v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(batch, t, self.n_kv, -1).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache[i, :rows, :, start:end] = k
        self.v_cache[i, :rows, :, start:end] = v
        keys, values = self.k_cache[i, :rows, :, :end], self.v_cache[i, :rows, :, :end]
        groups = self.n_heads // self.n_kv
        q = q.reshape(batch, self.n_kv, groups * t, self.head_dim)  # heads h = j * g + r share KV head j
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=self.scale)
        out = out.view(batch, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, -1)
        x = x + F.linear(out, attn.o_proj.weight)
        h = rms_norm(x, layer.post_attention_layernorm)
        gated = F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
        return x + F.linear(gated, mlp.down_proj.weight)
