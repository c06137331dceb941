"""A lean, exact decode path for the transformers families in `fast_families.FAMILIES` (llama, mistral,
qwen2, qwen3, gemma2, gemma3 text, cohere, gpt-neox).

Why: for small models the transformers forward spends most of a decode step in Python (mask building,
cache bookkeeping, kwargs plumbing), not in matmuls. This module runs the same maths straight on the HF
module's own parameters (no copies, so an optimizer step is visible at the next call) with a preallocated
static KV cache and `torch.nn.functional.scaled_dot_product_attention`. A one-token step can also run with
static shapes, the form a CUDA graph captures (`forward(..., column)`, used by `static_decode`).

The maths, per layer (x: (B, t, H), positions p), with the family's choices in brackets:

    h = N_attn(x);  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)      [gpt-neox: one fused Wqkv, per head q|k|v]
    q, k = N_q(q), N_k(k)                       [qwen3, gemma3, cohere: a norm over each head's d features]
    q, k = rope(q, p), rope(k, p)               # x * cos(p) + rotate(x) * sin(p) on the first r features
    s = q K^T * scale                           [scale = d^-1/2; gemma: query_pre_attn_scalar^-1/2]
    s = c tanh(s / c)                           [gemma2: c = attn_logit_softcapping]
    a = softmax(s + mask) V Wo (+bo);  a = N_attn_out(a)                            [gemma: post-attention norm]
    sequential:  x = x + a;  x = x + N_mlp_out(MLP(N_mlp(x)))                      [gemma: N_mlp_out]
    parallel:    x = x + a + MLP(N_mlp(x))      [cohere: N_mlp = N_attn's output h; gpt-neox: its own norm]
    MLP(h) = (act(h Wgate) * (h Wup)) Wdown, or act(h Wup + bup) Wdown + bdown (gpt-neox)

and logits = N_final(x[:, -1]) W_head^T, then [gemma: c tanh(logits / c), c = final_logit_softcapping]
[cohere: logits * logit_scale]. The embedding is the model's own module (gemma's scales by sqrt(H)).

Norms (weight w, bias b, eps e): "rms" w * x / sqrt(mean(x^2) + e); "rms_plus_one" (gemma) (1 + w) * x /
sqrt(mean(x^2) + e); "layer" (x - mean) / sqrt(var + e) * w + b; "layer_fp32" (cohere) the same without b,
computed in float32. Rope rotates pairs (x_i, x_{i+r/2}) ("halves": rotate(x) = [-x2, x1]) or adjacent pairs
(x_2i, x_2i+1) (cohere: rotate(x) = [-x1, x0, -x3, x2, ...]); cos/sin come from the model's own rotary
module (gemma3: one per layer type, local and global bases).

The mask allows key j for query i when key j is a real (non-padding) token at or before i; a padding query
may see itself only (its output is never read, but it must stay finite because it is cached). GQA is
computed without repeating K/V: the g query heads of a KV head are folded into the query-length axis,
(B, n_kv, g * t, d), which attends to (B, n_kv, S, d). Sliding-window layers are run only when the window
covers the whole sequence, where they equal full attention (`fast_families.unsupported_reason`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from polyalign.rollout.fast_families import FAMILIES, Block, rope_parameters, unsupported_reason

__all__ = ["FastDecoder", "unsupported_reason"]


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Llama's RMSNorm: w * (x / sqrt(mean(x^2) + eps)) normalised in float32, cast back, then weighted."""
    if x.dtype == torch.float32:  # one fused op instead of six
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


def rms_norm_plus_one(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Gemma's RMSNorm: (1 + w) * x / sqrt(mean(x^2) + eps), all in float32, then cast back."""
    y = F.rms_norm(x.float(), x.shape[-1:], eps=norm.eps)
    return (y * (1.0 + norm.weight.float())).to(x.dtype)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """nn.LayerNorm: (x - mean) / sqrt(var + eps) * w + b, in x's dtype."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_norm_fp32(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Cohere's LayerNorm: (x - mean) / sqrt(var + eps) * w over the last axis in float32, no bias; w may be
    (heads, d) for its per-head q/k norms."""
    y = F.layer_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon)
    return (y * norm.weight.float()).to(x.dtype)


NORMS = {
    "rms": rms_norm,
    "rms_plus_one": rms_norm_plus_one,
    "layer": layer_norm,
    "layer_fp32": layer_norm_fp32,
}


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """x (B, heads, t, d) rotated by the angles of its positions; cos/signed_sin (B, 1, t, r), r <= d.

    HF: x * cos + rotate(x) * sin on the first r features (gpt-neox passes the rest through). rotate(x) is
    [-x2, x1] (halves) or [-x1, x0, -x3, x2, ...] (adjacent): a permutation of x with some signs flipped.
    Here the permutation is a roll (halves) or a pair swap (adjacent) and the signs sit in signed_sin: the
    same products, since negation is exact.
    """
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rope(x[..., :r], cos, signed_sin, adjacent), x[..., r:]), -1)
    swapped = x.unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2) if adjacent else x.roll(r // 2, -1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _signed_sin(sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
    """sin (..., r) with the signs of rotate(): [-sin1, sin2] (halves) or [-s0, s0, -s1, s1, ...] (adjacent)."""
    if adjacent:
        signs = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)
        return (sin.unflatten(-1, (-1, 2)) * signs).flatten(-2)
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def attend(q, keys, values, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(q K^T * scale [-> c tanh(. / c)] + mask) V; q (B, n_kv, g*t, d), keys/values (B, n_kv, S, d)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))  # every row keeps its own key, so none is all -inf
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)


def _mkl_packs(layers: list[nn.Linear], rows: int) -> dict[int, torch.Tensor]:
    """CPU float32 with MKL: each weight copied into MKL's packed GEMM layout for `rows`-row inputs (the
    kernel inductor's CPU freezing uses); decode steps read it instead (2-3 ms less per 16-row step of
    a 28M model, 2 threads). Packed per decoder, i.e. per generate(), so an optimizer step in between is seen."""
    weight = layers[0].weight
    usable = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not usable:  # private ops: guarded
        return {}
    with torch.no_grad():
        return {id(m): torch.ops.mkl._mkl_reorder_linear_weight(m.weight, rows) for m in layers}


def _config_value(config, key: str | None):
    return getattr(config, key) if key else None


class FastDecoder:
    """Prefill and decode with a static KV cache, reading the weights of a HF model of a supported family.

    Cache slot j holds column j of the (left-padded) token sequence, so the attention mask over all
    columns so far doubles as the key mask.
    """

    def __init__(self, model: nn.Module, rows: int, max_len: int) -> None:
        config = model.config
        family = FAMILIES[config.model_type]
        backbone = model.base_model
        self.model, self.family = model, family
        self.embed, self.head = backbone.get_input_embeddings(), model.get_output_embeddings()
        self.blocks: list[Block] = [family.block(layer) for layer in backbone.layers]
        self.final_norm, self.norm = getattr(backbone, family.final_norm), NORMS[family.norm]
        self.parallel, self.act = family.parallel(config), ACT2FN[getattr(config, family.act_key)]
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = (_config_value(config, family.attn_scale_key) or self.head_dim) ** -0.5
        self.attn_softcap = _config_value(config, family.attn_softcap_key)
        self.final_softcap = _config_value(config, family.final_softcap_key)
        self.logit_scale = _config_value(config, family.logit_scale_key)
        self.adjacent = family.rope_pairs == "adjacent"
        self.rope_tables = self._rope_tables(backbone, config, max_len)
        kinds = config.layer_types if family.rope_per_layer_type else [None] * len(self.blocks)
        self.layer_rope = list(kinds)  # which table each layer rotates with
        weight = self.embed.weight
        shape = (len(self.blocks), rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = weight.new_zeros(shape)
        self.v_cache = weight.new_zeros(shape)
        self.max_len = max_len
        self.mkl = _mkl_packs([m for b in self.blocks for m in b.linears()] + [self.head], rows)
        self.mkl_rows = rows

    def _linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """x W^T + b; from the MKL-packed weight when x has the rows it was packed for."""
        packed, rows = self.mkl.get(id(layer)), self.mkl_rows
        if packed is None or x.numel() != rows * x.shape[-1]:
            return F.linear(x, layer.weight, layer.bias)
        y = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed, layer.weight, layer.bias, rows)
        return y.view(*x.shape[:-1], -1)

    def _rope_tables(self, backbone, config, max_len: int) -> dict:
        """cos/signed_sin (max_len, r) of every position from the model's own rotary module, per layer type
        (exact: the angles are elementwise per position)."""
        weight = self.embed.weight
        dummy, positions = weight.new_zeros(1), torch.arange(max_len, device=weight.device)[None]
        tables = {}
        for kind in rope_parameters(config, self.family):
            args = (dummy, positions) if kind is None else (dummy, positions, kind)
            cos, sin = backbone.rotary_emb(*args)
            tables[kind] = cos[0], _signed_sin(sin[0], self.adjacent)
        return tables

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the cache rows `keep` (finished rows leave the batch)."""
        self.k_cache, self.v_cache = self.k_cache[:, keep], self.v_cache[:, keep]

    def repeat(self, n: int, width: int) -> None:
        """Repeat each of the first rows n times (prefill once, sample n completions)."""
        rows = self.k_cache.shape[1] // n
        for cache in (self.k_cache, self.v_cache):
            cache[:, :, :, :width] = cache[:, :rows, :, :width].repeat_interleave(n, 1)

    def forward(self, ids, mask, positions, column: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens ids (B, t) at `positions` (B, t); mask (B, S) covers every column so far (S = start + t).

        Writes their keys/values into cache slots [S - t, S) and returns next-token logits (B, V) of the last
        position. B may be smaller than the cache's rows (the first B rows are used).
        Static shapes (CUDA-graph safe: no host sync, every shape fixed): with `column` (1,), a one-token
        step writes slot `column` and mask (B, max_len) covers the whole cache (slots not written yet: 0).
        """
        t = ids.shape[1]
        end = mask.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.max_len}")
        attn_mask = self._attention_mask(mask.bool(), t)  # (B, 1, g*t or 1, S)
        span = slice(end - t, end) if column is None else column
        angles = {kind: (cos[positions][:, None], sin[positions][:, None]) for kind, (cos, sin) in
                  self.rope_tables.items()}  # fmt: skip
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = self._layer(i, block, x, angles[self.layer_rope[i]], attn_mask, span, end)
        return self._logits(x[:, -1])

    __call__ = forward  # the interface of `hf._CachedRunner`: call, select, repeat

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._linear(self.norm(x, self.final_norm), self.head)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        return logits

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

    def _layer(self, i, block: Block, x, angles, attn_mask, span, end) -> torch.Tensor:
        h = self.norm(x, block.attn_norm)
        a = self._attention(i, block, h, angles, attn_mask, span, end)
        if block.attn_out_norm is not None:
            a = self.norm(a, block.attn_out_norm)
        if self.parallel:
            return x + a + self._mlp(block, h if block.mlp_norm is None else self.norm(x, block.mlp_norm))
        x = x + a
        m = self._mlp(block, self.norm(x, block.mlp_norm))
        return x + (m if block.mlp_out_norm is None else self.norm(m, block.mlp_out_norm))

    def _mlp(self, block: Block, h: torch.Tensor) -> torch.Tensor:
        if block.gate is None:
            return self._linear(self.act(self._linear(h, block.up)), block.down)
        return self._linear(self.act(self._linear(h, block.gate)) * self._linear(h, block.up), block.down)

    def _qkv(self, block: Block, h: torch.Tensor):
        """q (B, t, heads, d), k and v (B, t, n_kv, d)."""
        batch, t, _ = h.shape
        if block.qkv is not None:  # gpt-neox: per head [q | k | v]
            return self._linear(h, block.qkv).view(batch, t, self.n_heads, -1).chunk(3, -1)
        k, v = (self._linear(h, m).view(batch, t, self.n_kv, -1) for m in (block.k, block.v))
        return self._linear(h, block.q).view(batch, t, self.n_heads, -1), k, v

    def _attention(self, i, block: Block, h, angles, attn_mask, span, end) -> torch.Tensor:
        batch, t, _ = h.shape
        q, k, v = self._qkv(block, h)
        if block.q_norm is not None:
            q, k = self.norm(q, block.q_norm), self.norm(k, block.k_norm)
        cos, sin = angles
        q, k = (rope(x.transpose(1, 2), cos, sin, self.adjacent) for x in (q, k))
        for cache, new in ((self.k_cache, k), (self.v_cache, v.transpose(1, 2))):
            if isinstance(span, slice):
                cache[i, :batch, :, span] = new
            else:  # a slot held in a tensor
                cache[i, :batch].index_copy_(2, span, new)
        keys, values = self.k_cache[i, :batch, :, :end], self.v_cache[i, :batch, :, :end]
        groups = self.n_heads // self.n_kv
        q = q.reshape(batch, self.n_kv, groups * t, self.head_dim)  # heads h = j * g + r share KV head j
        out = attend(q, keys, values, attn_mask, self.scale, self.attn_softcap)
        out = out.view(batch, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, -1)
        return self._linear(out, block.o)
