"""Reward-model scorer: a frozen one-output scorer (`polyalign.models.load_reward_model`: a transformers
sequence classifier or a polyalign `ScoreModel`) used as a RewardFn.

What text is scored: `template.format(prompt=..., completion=...)`, by default "{prompt}{completion}",
i.e. the prompt immediately followed by its completion (the completion usually starts with a space).
Use template="{completion}" to score the completion alone. The tokenizer adds its usual special tokens
(BOS for Llama tokenizers). The score is the head's output at the last real token of the text.
Texts longer than `max_length` tokens are truncated on the LEFT, so the model still reads the end of
the completion.

The model is loaded once (`polyalign.models.load_reward_model`) and run in eval mode under
`torch.inference_mode`, in batches of `batch_size`.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from polyalign.logprobs import sequence_scores

__all__ = ["RewardModelScorer", "encode_texts", "score_texts", "sequence_scores"]

DEFAULT_TEMPLATE = "{prompt}{completion}"
_TEMPLATE_FIELDS = {"prompt", "completion"}


def _check_template(template: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if "completion" not in fields or not fields <= _TEMPLATE_FIELDS:
        raise ValueError(
            f"template must contain '{{completion}}' and may only use {sorted(_TEMPLATE_FIELDS)}, "
            f"got {template!r}"
        )


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize for scoring: right padding, truncation from the LEFT to `max_length` tokens.

    Sets the tokenizer's padding_side/truncation_side (the call-time arguments are not honoured for both).
    """
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.inference_mode()
def score_texts(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64, max_length: int = 512
) -> torch.Tensor:
    """(N,) float32 CPU scores of raw texts with a sequence classifier, in batches, without grad."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = encode_texts(tokenizer, texts[start : start + batch_size], max_length).to(device)
        out.append(sequence_scores(model, enc["input_ids"], enc["attention_mask"]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardModelScorer:
    """Callable RewardFn over a trained reward model; holds the loaded model (real state)."""

    def __init__(
        self,
        name_or_path: str = "stories260K-sentiment-rm",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        template: str = DEFAULT_TEMPLATE,
        max_length: int | None = None,
    ) -> None:
        from polyalign.models import load_reward_model  # lazy: transformers is heavy

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_template(template)
        self.name_or_path, self.batch_size, self.template = name_or_path, batch_size, template
        self.device = torch.device(device)
        self.model, self.tokenizer = load_reward_model(name_or_path, dtype=dtype, device=self.device)
        self.model.eval()
        # A transformers classifier reads the last token that is not config.pad_token_id: pad with that id.
        self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.model.config.pad_token_id)
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 512)

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        """The exact strings that get scored."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        return [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        return self.score_texts(self.texts(prompts, completions))

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """(B,) float32 CPU scores of raw texts (no template applied)."""
        return score_texts(self.model, self.tokenizer, texts, self.batch_size, self.max_length)

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.name_or_path!r}, template={self.template!r})"
