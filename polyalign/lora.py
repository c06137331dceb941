"""LoRA through peft: wrap a model so only adapters train, view its base as the reference, export checkpoints.

One copy of the weights serves both policy and reference: the reference is the policy with its adapter
disabled (`reference_view`), so LoRA runs hold one model, not two. The LoRA maths is peft's: a targeted
linear layer computes W x + scaling * B (A x), scaling = alpha / r, B initialised to 0 (so training starts
at the base model); only A and B (and, for classifiers, the new `score` head) receive gradients.

Checkpoints: `lora_state_dict` (adapter weights, peft names) and `merged_state_dict` (base weights with
W + scaling * B @ A folded in, original transformers names) are computed without touching the live model;
`export_lora` writes either or both as directories that peft / transformers load directly.

Knows nothing about trainers, losses or configs beyond `polyalign.config.LoraConfig`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import PreTrainedModel

from polyalign.config import LoraConfig
from polyalign.files import fsync_dir, fsync_file, remove_dir

EXPORT_MODES = ("adapter", "merged", "both")
# Class-name suffix -> peft task type; classifiers get their fresh head trained in full (modules_to_save).
_TASKS = {
    "ForCausalLM": TaskType.CAUSAL_LM,
    "LMHeadModel": TaskType.CAUSAL_LM,  # GPT-2
    "ForSequenceClassification": TaskType.SEQ_CLS,
    "ForTokenClassification": TaskType.TOKEN_CLS,
}
_HEAD_NAMES = ("score", "classifier")
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model_type -> every linear layer of a decoder block: the default LoRA targets (docs/models.md).
FAMILY_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "cohere"), _LLAMA_STYLE
    ),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D layers; peft adapts them with fan_in_fan_out
}


def _check_spec(spec: LoraConfig) -> None:
    if not (isinstance(spec.r, int) and spec.r >= 1):
        raise ValueError(f"lora.r must be an int >= 1, got {spec.r!r}")
    if not spec.alpha > 0:
        raise ValueError(f"lora.alpha must be > 0, got {spec.alpha!r}")
    if not 0 <= spec.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {spec.dropout!r}")
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(
            f"lora.target_modules must be 'all-linear' or a list of module names, got {targets!r}"
        )
    if isinstance(targets, list) and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"lora.target_modules must be a non-empty list of module names, got {targets!r}")


def _task_and_head(model: nn.Module) -> tuple[TaskType | None, str | None]:
    """peft task and the classifier head trained in full; task None for a `models.ScoreModel` (plain PeftModel)."""
    name = type(model).__name__
    task = next((t for suffix, t in _TASKS.items() if name.endswith(suffix)), None)
    if task == TaskType.CAUSAL_LM:
        return task, None
    head = next((h for h in _HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)), None)
    if head is None:
        raise ValueError(
            f"apply_lora: {name} is not a causal LM (a class name ending in ForCausalLM) nor a one-output "
            f"scorer with a head named one of {_HEAD_NAMES}"
        )
    return task, head


def default_targets(model: nn.Module) -> list[str] | str:
    """What target_modules "all-linear" adapts: the family's attention and MLP projections (`FAMILY_TARGETS`,
    the layers peft's all-linear finds there, named), else peft's "all-linear" for other families."""
    return FAMILY_TARGETS.get(getattr(model.config, "model_type", None), "all-linear")


def _check_targets(model: nn.Module, targets: list[str], head: str | None) -> None:
    """Every listed name must match a module (peft's rule: the full name or its last dotted parts)."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules {missing} match no module of {type(model).__name__}; its linear layers "
            f"are named {leaves}"
        )
    if head is not None and head in targets:
        raise ValueError(f"lora.target_modules must not list the classifier head {head!r}: it trains in full")


def apply_lora(model: nn.Module, spec: LoraConfig) -> PeftModel:
    """Wrap `model` (in place: it becomes the returned PeftModel's base) with LoRA adapters per `spec`.

    Only adapter weights require grad, plus the freshly initialised head (`score`) of a one-output scorer
    (PPO's critic, reward models). "all-linear" adapts every linear layer but the output head
    (`default_targets`).
    Gradient checkpointing may be on already: peft then hooks the input embeddings to require grad, so the
    adapters inside checkpointed blocks still get gradients (also with reentrant checkpointing).
    """
    _check_spec(spec)
    task, head = _task_and_head(model)
    targets = default_targets(model) if spec.target_modules == "all-linear" else spec.target_modules
    if isinstance(targets, list):
        _check_targets(model, targets, head)
    config = PeftLoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        task_type=task,
        bias="none",
        # A module to save is never adapted, also under "all-linear" (which itself skips only an LM head).
        modules_to_save=[head] if head else None,
    )
    peft_model = get_peft_model(model, config)
    if trainable_summary(peft_model)["trainable_params"] == 0:
        raise ValueError(f"apply_lora: no trainable parameters after applying {spec}")
    return peft_model


def trainable_summary(model: nn.Module) -> dict[str, int | float]:
    """Trainable and total parameter counts (tied weights counted once), for logs."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
    }


# ---- the reference: the base model behind the same weights ----


@contextlib.contextmanager
def base_model_mode(model: PeftModel) -> Iterator[None]:
    """Within this block `model` computes its base model: adapter disabled, every module in eval mode, no
    autograd. On exit (also on an exception) each module's train flag and each parameter's requires_grad
    are restored exactly as they were (peft's re-enable would otherwise set them by its own rule)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


class _BaseCall:
    """A callable standing in for one module of the policy: calls it inside `base_model_mode`."""

    def __init__(self, policy: PeftModel, module: nn.Module) -> None:
        self.module = module
        self._policy = policy
        # Callers may inspect the signature (e.g. the cache keyword of the backbone).
        self.forward = functools.wraps(module.forward)(functools.partial(_call_in_base_mode, policy, module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call_in_base_mode(self._policy, self.module, *args, **kwargs)


def _call_in_base_mode(policy: PeftModel, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with base_model_mode(policy):
        return module(*args, **kwargs)


def _has_adapter(module: nn.Module) -> bool:
    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in module.modules())


class ReferenceView(nn.Module):
    """The policy's base model (adapter disabled), usable wherever a frozen reference model is expected.

    Holds no weights of its own: the policy is kept outside nn.Module's registry, so `.eval()`, `.train()`,
    `.to()` and `.requires_grad_(False)` on the view never reach the policy's modules. `parameters()` yields
    the policy's frozen base weights (requires_grad False; for `next(ref.parameters()).device`), never an
    adapter. Every call runs in `base_model_mode`: eval mode and no gradients whatever the view's own flag.
    """

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not a submodule: see the class docstring

    @property
    def _inner(self) -> nn.Module:
        return self._policy.get_base_model()

    @property
    def base_model(self) -> _BaseCall:
        return _BaseCall(self._policy, self._inner.base_model)

    def get_output_embeddings(self) -> nn.Module | _BaseCall | None:
        head = self._inner.get_output_embeddings()
        return _BaseCall(self._policy, head) if head is not None and _has_adapter(head) else head

    @property
    def score(self) -> nn.Module | _BaseCall | None:
        head = getattr(self._inner, "score", None)
        return _BaseCall(self._policy, head) if head is not None and _has_adapter(head) else head

    @property
    def config(self) -> Any:
        return self._inner.config

    @property
    def generation_config(self) -> Any:
        return getattr(self._inner, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return self._inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self._inner.dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with base_model_mode(self._policy):
            return self._policy(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, param in self._inner.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            if not _is_adapter_name(name):
                yield name, param

    def requires_grad_(self, requires_grad: bool = True) -> ReferenceView:
        if requires_grad:
            raise ValueError("a reference view is frozen; train the policy's adapter instead")
        return self

    def extra_repr(self) -> str:
        return f"base of {type(self._inner).__name__} (adapter disabled), no weights of its own"


def _is_adapter_name(name: str) -> bool:
    parts = name.split(".")
    return "modules_to_save" in parts or any(p in LoraLayer.adapter_layer_names for p in parts)


def reference_view(model: PeftModel) -> ReferenceView:
    """The base model of `model` as a reference (adapter disabled per call), sharing every weight."""
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"reference_view needs a peft PeftModel (from apply_lora), got {type(model).__name__}"
        )
    return ReferenceView(model)


# ---- checkpoints ----


def lora_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """Adapter weights only (plus a classifier's trained head), in peft's names, as detached copies."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _special_modules(base: nn.Module) -> tuple[dict[str, LoraLayer], dict[str, AuxiliaryTrainingWrapper]]:
    layers, wrappers = {}, {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            layers[name] = module
        elif isinstance(module, AuxiliaryTrainingWrapper):
            wrappers[name] = module
    for name, layer in layers.items():
        if any(layer.use_dora.values()):
            raise ValueError(f"merged_state_dict: {name} is a DoRA layer; only plain LoRA is supported")
    return layers, wrappers


def _lora_delta(layer: LoraLayer) -> torch.Tensor | None:
    """Sum over the active adapters of scaling * B @ A (in the weight's layout), None when nothing to add."""
    if layer.merged:  # already folded into the base weight by peft
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return torch.stack(deltas).sum(0) if deltas else None


def _merged_entry(key: str, value, layers, wrappers) -> tuple[str, torch.Tensor] | None:
    """Map one key of the injected model's state dict to its original name (None: adapter-only entry)."""
    for path, layer in layers.items():
        if key.startswith(path + "."):
            rest = key[len(path) + 1 :]
            if not rest.startswith("base_layer."):
                return None
            rest = rest[len("base_layer.") :]
            delta = _lora_delta(layer) if rest == "weight" else None
            return f"{path}.{rest}", (value if delta is None else value + delta.to(value.dtype))
    for path, wrapper in wrappers.items():
        if key.startswith(path + "."):
            active = f"{path}.modules_to_save.{wrapper.active_adapters[0]}."
            return (path + "." + key[len(active) :], value) if key.startswith(active) else None
    return key, value


@torch.no_grad()
def merged_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with W + scaling * B @ A folded into every adapted weight, under the
    original transformers names (loadable into a fresh model of the base class); a classifier's head is the
    trained copy. The live model is not modified. Adapted weights are new tensors; every other entry is the
    live tensor itself (detached, not copied): do not modify them in place."""
    base = model.get_base_model()
    layers, wrappers = _special_modules(base)
    merged = {}
    for key, value in base.state_dict().items():
        entry = _merged_entry(key, value.detach(), layers, wrappers)
        if entry is not None:
            merged[entry[0]] = entry[1]
    return merged


def _plain_model(model: PeftModel) -> PreTrainedModel:
    """A transformers model of the base class holding the merged weights (built on the meta device, then
    the merged tensors are assigned: no extra copy of the unadapted weights). For saving only: its
    non-persistent buffers (e.g. rotary frequencies) stay on the meta device."""
    base = model.get_base_model()
    with torch.device("meta"):
        plain = type(base)(copy.deepcopy(base.config))
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)
    return plain


def _write_atomically(final: Path, write) -> Path:
    """Run write(tmp_dir) in a sibling `.tmp-*` directory, fsync it, then rename it to `final` (atomic on
    POSIX; an existing `final` is replaced). A crash leaves the old `final` or the new one."""
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
        if final.exists():
            remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final


def export_lora(model: PeftModel, directory: Path, mode: str, tokenizer: Any = None) -> list[Path]:
    """Write `directory/adapter/` (peft format: `PeftModel.from_pretrained(base, dir)`) and/or
    `directory/merged/` (a plain transformers model dir: config, model.safetensors, the tokenizer when
    given) per mode adapter | merged | both. Each directory appears atomically. Returns the paths written."""
    if mode not in EXPORT_MODES:
        raise ValueError(f"export_lora: mode {mode!r} not in {'|'.join(EXPORT_MODES)}")
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_lora needs a peft PeftModel (from apply_lora), got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if mode in ("adapter", "both"):
        written.append(_write_atomically(directory / "adapter", lambda tmp: model.save_pretrained(tmp)))
    if mode in ("merged", "both"):

        def write_merged(tmp: Path) -> None:
            _plain_model(model).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        written.append(_write_atomically(directory / "merged", write_merged))
    return written
