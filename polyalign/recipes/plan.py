"""Memory planner: which models a run holds, in which dtype, and the expected peak memory per process.

Parameter counts come from each model's CONFIG, built on the meta device (no weights are read or
allocated; a hub id needs its config only: `plan_counts.py`); which models a run holds is `plan_models.py`.
Every byte count is per process:

- weights of every held model; gradients (parameter dtype) and AdamW state (exp_avg and exp_avg_sq in the
  parameter dtype, plus a float32 `step` scalar per tensor) of the trained ones. LoRA: only the adapter
  trains, and the reference is the base with the adapter disabled (no copy).
- FSDP (`model.parallel: fsdp`, N processes): the trained models and the reference are sharded (divided by
  N), plus the largest FSDP unit (a decoder layer, or the root's embeddings and head) unsharded while
  training and the whole policy gathered while generating. DDP: a full replica per process plus its
  gradient buckets (one more copy of the gradients). Scoring reward models are sharded under FSDP too.
- activations kept for backward by one training micro-batch, the float32 softmax the log-prob head keeps,
  and the generation engine (HF: the KV cache; vLLM: its `gpu_memory_utilization` share of the GPU).

Phases: gradients are freed after each optimizer step (`train/loop.py`), so the KV cache (generation) and
gradients + activations (training) are never held together; the peak is the larger phase. Not counted: the
CUDA context, allocator fragmentation, and transient forwards without gradient (reference / reward-model
scoring, which hold one layer's activations at a time). Formulas and measured checks: docs/memory.md.

    polyalign plan configs/quickstart.yaml [--nproc 8] [--gpu-memory 80] [--json] [--model.dtype=bfloat16]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from polyalign.config import ConfigError, RunConfig, load_config
from polyalign.config_offline import OfflineRunConfig, is_offline_config, load_offline_config
from polyalign.recipes.plan_counts import (  # noqa: F401  (re-exported: the planner's public counting API)
    ADAM_STEP_BYTES,
    DTYPE_BYTES,
    Count,
    Shape,
    activation_bytes,
    count_model,
    kv_cache_bytes,
    layer_activation_bytes,
)
from polyalign.recipes.plan_models import Entry, offline_models, online_models

GIB = 2**30


@dataclass(frozen=True)
class HeldModel:
    role: str
    """policy | reference | value_model | reward_model."""
    source: str
    dtype: str
    params: int
    trainable_params: int
    bytes_weights: int
    """Per process: divided across processes when `sharded`."""
    bytes_grads: int
    bytes_optimizer: int
    sharded: bool
    setup_only: bool = False
    """Held only while reference log-probs are precomputed (offline), then freed."""


@dataclass(frozen=True)
class MemoryPlan:
    kind: str
    """online | offline."""
    algorithm: str
    world_size: int
    parallel: str
    models: tuple[HeldModel, ...]
    train_rows: int
    """Rows of one training micro-batch on one process."""
    train_seq: int
    """Tokens per row fed to the model (upper bound: longest prompt + completion)."""
    completion_tokens: int
    """Completion tokens per row that go through the log-prob head (upper bound)."""
    bytes_activations: int
    bytes_logits: int
    bytes_kv_cache: int
    bytes_engine: int
    """vLLM's reservation (gpu_memory_utilization x GPU memory); 0 for the HF engine or when unknown."""
    bytes_fsdp_buffer: int
    """fsdp: the largest unit's weights + gradients gathered unsharded while training."""
    bytes_fsdp_generation: int
    """fsdp: the whole policy gathered unsharded while generating (`distributed.gathered`)."""
    bytes_ddp_buckets: int
    """ddp: DistributedDataParallel's gradient buckets, one more copy of the trained models' gradients."""
    phases: dict[str, int]
    bytes_peak: int
    gpu_memory_gib: float | None
    notes: tuple[str, ...]


def _held(entry: Entry, sharded: bool, n: int) -> HeldModel:
    count, split = entry.count, n if sharded else 1
    return HeldModel(
        role=entry.role,
        source=entry.source,
        dtype=entry.dtype,
        params=count.params,
        trainable_params=count.trainable,
        bytes_weights=-(-count.weight_bytes // split),
        bytes_grads=-(-count.trainable_bytes // split),
        bytes_optimizer=-(-2 * count.trainable_bytes // split) + ADAM_STEP_BYTES * count.trainable_tensors,
        sharded=sharded,
        setup_only=entry.setup_only,
    )


# ---------------------------------------------------------------- the two planners


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _split(total: int, n: int, what: str) -> None:
    """train/distributed.shard: every process takes an equal share."""
    if total % n:
        raise ValueError(f"{what} ({total}) must be a multiple of the number of processes ({n})")


def _online_rows(cfg: RunConfig, n: int) -> tuple[int, int]:
    """(rollout rows, training micro-batch rows) per process; micro-batches hold whole groups."""
    _split(cfg.rollout.prompts_per_step, n, "rollout.prompts_per_step")
    group = cfg.rollout.samples_per_prompt
    batch = cfg.rollout.prompts_per_step * group
    minibatch = _ceil(batch // cfg.algo.updates_per_batch, n)
    micro = cfg.train.micro_batch_size
    return _ceil(batch, n), min(minibatch, max(1, micro // group) * group) if micro else minibatch


def _online_engine(cfg: RunConfig, shape: Shape, rollout_rows: int, gpu: float | None, notes: list[str]):
    """(KV cache bytes, vLLM reservation bytes)."""
    r, b = cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    if r.engine == "vllm":
        share = r.vllm.gpu_memory_utilization
        reserved = int(share * gpu * GIB) if gpu else 0
        where = f" = {_human(reserved)}" if gpu else "; pass --gpu-memory GIB to count it"
        notes.append(
            f"vLLM reserves rollout.vllm.gpu_memory_utilization = {share} of the GPU{where} "
            "(its own copy of the policy weights + KV cache), for the whole run"
        )
        return 0, reserved
    prompt = cfg.data.max_prompt_tokens
    kv = kv_cache_bytes(shape, rollout_rows, prompt + r.max_new_tokens, b)
    if cfg.eval.every and cfg.data.eval_prompts:
        kv = max(kv, kv_cache_bytes(shape, cfg.eval.num_prompts, prompt + cfg.eval.max_new_tokens, b))
    return kv, 0


def _plan_online(cfg: RunConfig, n: int, gpu: float | None) -> MemoryPlan:
    m, r = cfg.model, cfg.rollout
    notes: list[str] = []
    entries = online_models(cfg, notes)
    policy, b = entries[0].count, DTYPE_BYTES[m.dtype]
    rollout_rows, rows = _online_rows(cfg, n)
    seq, completion = cfg.data.max_prompt_tokens + r.max_new_tokens, r.max_new_tokens
    act, logits = activation_bytes(policy.shape, rows, seq, completion, b, m.gradient_checkpointing, True)
    _checkpointing_note(policy.shape, (rows, seq, completion, b), m.gradient_checkpointing, act, notes)
    for e in entries:
        if e.role == "value_model":  # forward with gradients in the same micro-batch as the policy's
            act += activation_bytes(e.count.shape, rows, seq, completion, b, False, False)[0]
    kv, engine = _online_engine(cfg, policy.shape, rollout_rows, gpu, notes)
    return _assemble(
        ("online", cfg.algo.name, m.parallel, n, gpu),
        entries,
        (rows, seq, completion),
        (act, logits, kv, engine),
        notes,
    )


def _plan_offline(cfg: OfflineRunConfig, n: int, gpu: float | None) -> MemoryPlan:
    m, t, name = cfg.model, cfg.train, cfg.loss.name
    notes: list[str] = []
    is_rm = name == "reward_model"
    entries = offline_models(cfg, notes)
    trained = entries[0].count
    _split(t.batch_size, n, "train.batch_size")
    pairs = min(t.micro_batch_size, t.batch_size // n) if t.micro_batch_size else t.batch_size // n
    rows = pairs * (1 if name == "sft" else 2)  # chosen and rejected go through one forward
    seq = cfg.data.max_length
    completion = seq if is_rm else seq - 1  # a classifier's head reads every position
    b, checkpointing = DTYPE_BYTES[m.dtype], m.gradient_checkpointing and not is_rm
    act, logits = activation_bytes(trained.shape, rows, seq, completion, b, checkpointing, not is_rm)
    if not is_rm:  # the reward-model trainer does not checkpoint
        _checkpointing_note(trained.shape, (rows, seq, completion, b), checkpointing, act, notes)
    return _assemble(
        ("offline", name, m.parallel, n, gpu), entries, (rows, seq, completion), (act, logits, 0, 0), notes
    )


def _checkpointing_note(shape: Shape, dims: tuple, on: bool, act: int, notes: list[str]) -> None:
    other = activation_bytes(shape, *dims, checkpointing=not on, lm_head=True)[0]
    if on:
        notes.append(
            f"gradient checkpointing on: layer inputs kept, one layer recomputed (off: {_human(other)})"
        )
    else:
        notes.append(
            f"model.gradient_checkpointing=true would cut activations {_human(act)} -> {_human(other)}"
        )


def _assemble(run: tuple, entries: list[Entry], dims: tuple, sizes: tuple, notes: list[str]) -> MemoryPlan:
    """Per-process models, phases and the peak. run = (kind, algorithm, parallel, n, gpu GiB); dims = (rows,
    seq, completion tokens); sizes = (activations, logits, KV cache, vLLM reservation) bytes."""
    kind, algorithm, parallel, n, gpu = run
    act, logits, kv, engine = sizes
    fsdp, ddp = n > 1 and parallel == "fsdp", n > 1 and parallel == "ddp"
    models = tuple(_held(e, fsdp and e.shardable, n) for e in entries)
    buffer = max((e.count.largest_unit_bytes for e in entries if e.shardable), default=0) if fsdp else 0
    gather = entries[0].count.weight_bytes if fsdp and kind == "online" else 0
    held = [h for h in models if not h.setup_only]
    buckets = sum(h.bytes_grads for h in held) if ddp else 0  # allocated with the DDP wrapper, kept
    persistent = sum(h.bytes_weights + h.bytes_optimizer for h in held) + engine + buckets
    phases = {}
    if len(held) < len(models):  # optimizer state appears at the first step, after the precompute
        phases["reference precompute"] = sum(h.bytes_weights for h in models) + buffer + buckets
    if kind == "online":
        phases["generation"] = persistent + kv + gather
    phases["training"] = persistent + sum(h.bytes_grads for h in held) + act + logits + buffer
    peak = max(phases.values())
    notes += _parallel_notes(parallel, n, buffer, gather, buckets) + _fit_note(peak, gpu)
    sizes = dict(bytes_activations=act, bytes_logits=logits, bytes_kv_cache=kv, bytes_engine=engine)
    return MemoryPlan(
        kind, algorithm, n, parallel, models, *dims, **sizes, bytes_fsdp_buffer=buffer,
        bytes_fsdp_generation=gather, bytes_ddp_buckets=buckets, phases=phases, bytes_peak=peak,
        gpu_memory_gib=gpu, notes=tuple(notes),
    )  # fmt: skip


def _parallel_notes(parallel: str, n: int, buffer: int, gather: int, buckets: int) -> list[str]:
    if n == 1:
        return ["one process: model.parallel does not apply"]
    if parallel == "fsdp":
        generation = f"; the whole policy is gathered to generate: {_human(gather)}" if gather else ""
        return [
            f"fsdp over {n} processes: trained models and the reference are sharded; the largest unit "
            f"(decoder layer or root embeddings/head, weights + grads) is gathered to train: {_human(buffer)}"
            + generation
        ]
    return [f"ddp over {n} processes: a full replica per process, plus gradient buckets: {_human(buckets)}"]


def _fit_note(peak: int, gpu: float | None) -> list[str]:
    if gpu is None:
        return []
    if peak <= gpu * GIB:
        return [
            f"fits in {gpu:g} GiB ({_human(int(gpu * GIB) - peak)} to spare, before CUDA context/fragmentation)"
        ]
    return [f"does NOT fit in {gpu:g} GiB: the peak is {_human(peak)}"]


def plan_memory(
    cfg: RunConfig | OfflineRunConfig, world_size: int = 1, gpu_memory_gib: float | None = None
) -> MemoryPlan:
    """The models a run holds and its expected peak memory per process (see the module docstring)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib!r}")
    if isinstance(cfg, OfflineRunConfig):
        return _plan_offline(cfg, world_size, gpu_memory_gib)
    if isinstance(cfg, RunConfig):
        return _plan_online(cfg, world_size, gpu_memory_gib)
    raise TypeError(f"plan_memory needs a RunConfig or OfflineRunConfig, got {type(cfg).__name__}")


# ---------------------------------------------------------------- output


def _human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _count_str(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_plan(plan: MemoryPlan) -> str:
    """A readable report: one row per held model, then activations, engine, phases, the peak and notes."""
    p = plan
    head = ["role", "source", "dtype", "params", "trainable", "weights", "grads", "optimizer", "sharded"]
    rows = [head] + [
        [
            h.role + (" (setup)" if h.setup_only else ""),
            h.source,
            h.dtype,
            _count_str(h.params),
            _count_str(h.trainable_params),
            _human(h.bytes_weights),
            _human(h.bytes_grads),
            _human(h.bytes_optimizer),
            "yes" if h.sharded else "no",
        ]
        for h in p.models
    ]
    extra = [
        [
            "activations",
            _human(p.bytes_activations),
            f"micro-batch {p.train_rows} rows x {p.train_seq} tokens",
        ],
        [
            "logits",
            _human(p.bytes_logits),
            f"{p.completion_tokens} completion tokens per row through the head",
        ],
        [
            "KV cache",
            _human(p.bytes_kv_cache),
            "HF engine, one rollout" if p.kind == "online" else "no generation",
        ],
        ["vLLM engine", _human(p.bytes_engine), "gpu_memory_utilization share"],
        ["FSDP unit", _human(p.bytes_fsdp_buffer), "training: largest unit gathered unsharded"],
        ["FSDP gather", _human(p.bytes_fsdp_generation), "generation: whole policy gathered unsharded"],
        ["DDP buckets", _human(p.bytes_ddp_buckets), "a second copy of the gradients"],
    ]
    extra += [[f"phase: {name}", _human(v), ""] for name, v in p.phases.items()]
    extra.append(["PEAK per process", _human(p.bytes_peak), f"{p.world_size} process(es), {p.parallel}"])
    title = (
        f"polyalign memory plan: {p.kind} {p.algorithm}, {p.world_size} process(es), parallel {p.parallel}"
    )
    lines = [title, "", *_table(rows), "", *_table(extra), "", "notes:", *(f"- {n}" for n in p.notes)]
    return "\n".join(lines)


def cli_plan(
    config: str | None,
    overrides: list[str],
    nproc: int = 1,
    gpu_memory_gib: float | None = None,
    as_json: bool = False,
) -> int:
    """`polyalign plan [CONFIG.yaml] [--nproc N] [--gpu-memory GIB] [--json] [--section.key=value ...]`."""
    from pathlib import Path

    offline = config is not None and Path(config).is_file() and is_offline_config(config)
    try:
        cfg = (load_offline_config if offline else load_config)(config, overrides)
        plan = plan_memory(cfg, world_size=nproc, gpu_memory_gib=gpu_memory_gib)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"polyalign plan: {e}") from None
    print(json.dumps(dataclasses.asdict(plan), indent=1) if as_json else format_plan(plan))
    return 0
