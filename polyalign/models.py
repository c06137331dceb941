"""Load policies, reference models, reward models and tokenizers by name or path.

A model is named by a builtin short name (see `BUILTIN`), a local folder, or a Hugging Face hub id (passed
through to `from_pretrained`, which fetches it when online). This module owns every `from_pretrained`
call; it knows nothing about training or losses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from polyalign.files import atomic_write_json, looks_local

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
    if looks_local(name) or os.path.exists(expanded):
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


SCORE_HEAD = "score_head.safetensors"  # ScoreModel's head weights, next to the backbone's own files
SCORE_CONFIG = "score_head.json"  # {"format": SCORE_FORMAT, "hidden_size": H, "outputs": 1}
SCORE_FORMAT = "polyalign-score-head-v1"


class ScoreModel(nn.Module):
    """A one-output scorer for families transformers gives no sequence classifier (e.g. Cohere): the base model
    (`AutoModel`) plus a bias-free linear head we own, under the names polyalign reads on a transformers
    `...ForSequenceClassification(num_labels=1)`: `.base_model` and `.score` (per-token values,
    `logprobs.value_forward`), `forward(input_ids, attention_mask).logits` (B, 1) read at each row's last token
    with attention_mask 1 (left or right padding), `config`, `_no_split_modules` (FSDP) and `save_pretrained`:
    the backbone's files plus SCORE_HEAD and SCORE_CONFIG, read back by `load_score_model`."""

    def __init__(self, config, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.base_model = backbone if backbone is not None else AutoModel.from_config(config)
        self.config = self.base_model.config
        self._no_split_modules = getattr(self.base_model, "_no_split_modules", None)
        hidden = self.config.get_text_config().hidden_size
        self.score = nn.Linear(hidden, 1, bias=False, dtype=self.base_model.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SequenceClassifierOutput:
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        out = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * attention_mask).argmax(1)  # (B,)
        hidden = out.last_hidden_state[torch.arange(len(last), device=last.device), last]  # (B, H)
        return SequenceClassifierOutput(logits=self.score(hidden))

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None, **kwargs) -> None:
        # SCORE_CONFIG first: a folder cut short by a crash then fails to load instead of getting a fresh head.
        Path(directory).mkdir(parents=True, exist_ok=True)
        info = {"format": SCORE_FORMAT, "hidden_size": self.score.in_features, "outputs": 1}
        atomic_write_json(Path(directory) / SCORE_CONFIG, info)
        state = self.state_dict() if state_dict is None else state_dict
        body = {k.removeprefix("base_model."): v for k, v in state.items() if k.startswith("base_model.")}
        self.base_model.save_pretrained(directory, state_dict=body, **kwargs)
        save_file({"weight": state["score.weight"].contiguous()}, Path(directory) / SCORE_HEAD)


def _saved_score_model(path: str, dtype: torch.dtype) -> ScoreModel:
    info = json.loads((Path(path) / SCORE_CONFIG).read_text())
    model = ScoreModel(None, AutoModel.from_pretrained(path, dtype=dtype))
    head = load_file(str(Path(path) / SCORE_HEAD))
    if info.get("format") != SCORE_FORMAT or head["weight"].shape != model.score.weight.shape:
        raise ValueError(
            f"{path}/{SCORE_CONFIG}: format {info.get('format')!r} with a head of shape "
            f"{tuple(head['weight'].shape)}; expected {SCORE_FORMAT!r} and {tuple(model.score.weight.shape)}"
        )
    with torch.no_grad():
        model.score.weight.copy_(head["weight"])
    return model


def load_score_model(
    name_or_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", seed: int = 0
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A one-output scorer (reward model, PPO critic) and its tokenizer, in train mode.

    A folder saved by `ScoreModel` loads as one; a transformers sequence classifier loads as its class; a
    causal LM becomes its family's `...ForSequenceClassification(num_labels=1)`, or a `ScoreModel` when
    transformers has none, with a fresh head drawn from normal(0, initializer_range) with `seed`.
    """
    path, dtype = resolve_model_path(name_or_path), _dtype(dtype)
    tokenizer = load_tokenizer(path)
    if os.path.isfile(os.path.join(path, SCORE_CONFIG)):
        return _finish(_saved_score_model(path, dtype), tokenizer, device).train(), tokenizer
    config = AutoConfig.from_pretrained(path)
    missing = ["score.weight"]
    if type(config) in AutoModelForSequenceClassification._model_mapping:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, output_loading_info=True
        )
        missing = info["missing_keys"]
    else:
        model = ScoreModel(config, AutoModel.from_pretrained(path, dtype=dtype))
    if any(key.startswith("score.") for key in missing):
        std, generator = config.get_text_config().initializer_range, torch.Generator().manual_seed(seed)
        with torch.no_grad():  # do not rely on from_pretrained's init of missing weights
            model.score.weight.normal_(0.0, std, generator=generator)
            if model.score.bias is not None:
                model.score.bias.zero_()
    return _finish(model, tokenizer, device).train(), tokenizer


def load_reward_model(
    name_or_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A frozen one-output scorer (`load_score_model`) in eval mode, and its tokenizer."""
    model, tokenizer = load_score_model(name_or_path, dtype, device)
    return model.eval().requires_grad_(False), tokenizer


def load_base_classifier(base: str, seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A trainable one-output scorer from a causal-LM checkpoint with a fresh seeded head (`load_score_model`)."""
    return load_score_model(base, seed=seed)
