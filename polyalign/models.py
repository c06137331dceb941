"""Load policies, reference models, reward models and tokenizers by name or path.

A model is named by a builtin short name (see `BUILTIN`), a local folder, or a Hugging Face hub id (passed
through to `from_pretrained`, which fetches it when online). This module owns every `from_pretrained`
call; it knows nothing about training or losses.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

_ASSETS = Path(__file__).resolve().parent / "assets"

BUILTIN: dict[str, Path] = {
    "stories260K": _ASSETS / "stories260K",
    "stories260K-sentiment-rm": _ASSETS / "sentiment_rm",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything with a path prefix or more slashes is a local path."""
    return (
        name.startswith(("./", "../", "/", "~", ".\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a builtin short name, a local folder or a hub id to what `from_pretrained` accepts.

    Raises:
        FileNotFoundError: for a builtin whose folder is missing, or a string that looks like a local
            path (starts with ./, ../, /, ~ or has more than one path separator) and does not exist.
    """
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path):
        raise ValueError(f"model name or path must be a non-empty string, got {name_or_path!r}")
    name = str(name_or_path)
    if name in BUILTIN:
        path = BUILTIN[name]
        if not path.is_dir():
            raise FileNotFoundError(
                f"builtin model {name!r} is registered at {path} but that folder is missing"
            )
        return str(path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if _looks_like_path(name) or os.path.exists(expanded):
        raise FileNotFoundError(
            f"model path {name!r} does not exist or is not a folder; builtin names: {sorted(BUILTIN)}; "
            "anything else is treated as a Hugging Face hub id like 'owner/model'"
        )
    return name


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _config_pad_token(path: str) -> int | None:
    try:
        return AutoConfig.from_pretrained(path).get_text_config().pad_token_id
    except (OSError, ValueError):  # no config (a tokenizer-only folder) or an unknown architecture
        return None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer with a pad token guaranteed.

    A missing pad token is taken from the model config's pad_token_id, else the eos token, else unk.
    Callers set `padding_side` themselves: the rollout engine left-pads prompts, collators right-pad.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        pad_id = _config_pad_token(path)
        if pad_id is not None and 0 <= pad_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        elif tokenizer.eos_token or tokenizer.unk_token:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        else:
            raise ValueError(f"tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with")
    return tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device):
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def load_policy(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trainable causal LM (train mode) and its tokenizer."""
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype))
    if gradient_checkpointing:
        # Renamed to activation checkpointing in transformers 5; the old name warns there.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
        model.config.use_cache = False
    model.train()
    return _finish(model, tokenizer, device), tokenizer


def load_reference(
    name_or_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen causal LM in eval mode (the KL reference)."""
    model, tokenizer = load_policy(name_or_path, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def load_reward_model(
    name_or_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen sequence classifier with one output (the score) in eval mode, and its tokenizer."""
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=_dtype(dtype))
    model.eval().requires_grad_(False)
    return _finish(model, tokenizer, device), tokenizer


def load_base_classifier(base: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Sequence classifier (num_labels=1) from a causal-LM checkpoint; fresh seeded score head.

    The pad token is the base config's pad id (unk for stories260K), so the saved tokenizer and
    config.pad_token_id agree.
    """
    path = resolve_model_path(base)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"base model {base!r} has neither a pad nor an eos token id")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=pad_id)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"expected a one-output `score` head on {type(model).__name__}, got {head!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # do not rely on from_pretrained's init of missing weights
        head.weight.normal_(0.0, config.initializer_range, generator=generator)
        if head.bias is not None:
            head.bias.zero_()
    return model, tokenizer
