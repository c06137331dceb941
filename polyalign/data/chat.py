"""Prompt rendering, tokenization and collation: the ONE place where text becomes token ids
for training on given completions (DPO / IPO / offline CoPG / SFT).

Rendering (`render_prompt`):
- chat template: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` when the tokenizer
  has a `chat_template` and the prompt is a message list, or when `use_chat_template=True` (a string
  prompt is then sent as one user message); a template without a system role gets the system text merged
  into the first user turn (`apply_chat_template`);
- plain template otherwise: a string prompt is used as is (so for the base stories260K model the prompt is
  the raw text); a message list is written HH-style, "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}..."
  (system turns as "\\n\\nSystem: ...") ending with "\\n\\nAssistant:", the same layout as Anthropic HH data.

Tokenization: prompt and completion are tokenized SEPARATELY and concatenated, so a prompt's tokens are
identical whether tokenized alone (for generation) or with any completion, and the chosen and rejected
completions of a pair share one prompt. Plain-text prompts get the tokenizer's special tokens (BOS);
chat-template text already contains them, so it is tokenized without adding any. The completion gets no
special tokens, then EOS (`add_eos=True`). Note: SentencePiece (Llama) tokenizers start the completion with
a word boundary, as if a space preceded it.

Truncation, per example, to at most `max_length` prompt + completion tokens, keeping the prompt (TRL's
order): the model must see what it answers.
1. the prompt is cut from the LEFT to `min(max_prompt_length, max_length - 1)` tokens and flagged
   `prompt_truncated`; a leading BOS token is kept when at least two prompt tokens fit;
2. each completion is cut from the RIGHT to the room left, `max_length - prompt length` (losing its EOS),
   and flagged `completion_truncated` (`chosen_truncated` / `rejected_truncated` for a pair).

Collation: prompts LEFT padded, completions RIGHT padded, masks 1 on real tokens, ready for
`polyalign.logprobs.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)`.
Shape letters as in polyalign/types.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from jinja2 import TemplateError

from polyalign.data.messages import normalize_messages

if TYPE_CHECKING:
    from polyalign.data.preference import PreferencePair

PLAIN_ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}


def plain_template(messages: list[dict[str, str]]) -> str:
    """The HH-style rendering used when no chat template applies (see the module docstring)."""
    turns = "".join(f"\n\n{PLAIN_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)
    return turns + "\n\nAssistant:"


def _render(tokenizer, prompt: str | list[dict], use_chat_template: bool | None) -> tuple[str, bool]:
    """(prompt text, whether it came from the chat template)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    use = isinstance(prompt, list) and has_template if use_chat_template is None else use_chat_template
    messages = normalize_messages(prompt, "prompt") if isinstance(prompt, list) else None
    if use:
        if not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        messages = messages if messages is not None else [{"role": "user", "content": prompt}]
        return apply_chat_template(tokenizer, messages), True
    return (prompt if messages is None else plain_template(messages)), False


def apply_chat_template(tokenizer, messages: list[dict[str, str]]) -> str:
    """The template's prompt text (generation prompt added). A template with no system role (it raises, or
    drops the text: Gemma, Mistral v0.1) gets the system text merged into the first user turn as Gemma
    documents it, "{system}\n\n{user}", so it is never lost."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Kept: the system text occurs more often than the other turns account for.
        if not system or text.count(system) > sum(m["content"].count(system) for m in messages[1:]):
            return text
    except TemplateError:
        if system is None:
            raise
    rest = messages[1:]
    user = rest.pop(0)["content"] if rest and rest[0]["role"] == "user" else None
    merged = {"role": "user", "content": system if user is None else f"{system}\n\n{user}"}
    return tokenizer.apply_chat_template([merged, *rest], tokenize=False, add_generation_prompt=True)


def render_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool | None = None) -> str:
    """The prompt text a model sees; `use_chat_template=None` uses the template for message lists only."""
    return _render(tokenizer, prompt, use_chat_template)[0]


def tokenize_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool | None = None) -> list[int]:
    """Prompt token ids, exactly as `tokenize_pair` puts them before a completion (before truncation)."""
    text, templated = _render(tokenizer, prompt, use_chat_template)
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    eos = tokenizer.eos_token_id
    if not templated and ids and ids[-1] == eos and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # tokenizers configured with add_eos_token would end the prompt
    if not ids:
        raise ValueError(f"prompt {prompt!r:.80} has no tokens (and the tokenizer adds no BOS)")
    return ids


def tokenize_completion(tokenizer, completion: str, add_eos: bool = True) -> list[int]:
    """Completion token ids: no special tokens, then EOS when `add_eos`."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"completion {completion!r:.80} has no tokens")
    return ids


@dataclass(frozen=True)
class TokenizedExample:
    """One prompt + completion as token ids, after truncation."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_truncated: bool = False
    completion_truncated: bool = False
    language: str | None = None


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids, after truncation; both completions follow the same prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    language: str | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_length < 2 or max_prompt_length < 1:
        raise ValueError(
            f"need max_length >= 2 and max_prompt_length >= 1, got {max_length}, {max_prompt_length}"
        )


def _left_truncate(ids: list[int], length: int, bos_id: int | None) -> list[int]:
    """The last `length` tokens; a leading BOS stays in front when length >= 2."""
    if len(ids) <= length:
        return ids
    if bos_id is not None and ids[0] == bos_id and length >= 2:
        return [bos_id] + ids[len(ids) - length + 1 :]
    return ids[len(ids) - length :]


def _fit(prompt_ids, completions, max_length, max_prompt_length, bos_id) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation policy of the module docstring to a prompt and its completion(s)."""
    _check_lengths(max_length, max_prompt_length)
    prompt_ids = _left_truncate(prompt_ids, min(max_prompt_length, max_length - 1), bos_id)
    room = max_length - len(prompt_ids)
    return prompt_ids, [ids[:room] for ids in completions]


def tokenize_pair(
    tokenizer,
    prompt: str | list[dict],
    completion: str,
    max_length: int,
    max_prompt_length: int,
    *,
    add_eos: bool = True,
    use_chat_template: bool | None = None,
    language: str | None = None,
) -> TokenizedExample:
    """A prompt and one completion as token ids, truncated by the module's policy."""
    prompt_ids = tokenize_prompt(tokenizer, prompt, use_chat_template)
    completion_ids = tokenize_completion(tokenizer, completion, add_eos)
    new_prompt, (new_completion,) = _fit(
        prompt_ids, [completion_ids], max_length, max_prompt_length, tokenizer.bos_token_id
    )
    return TokenizedExample(
        new_prompt, new_completion, new_prompt != prompt_ids, new_completion != completion_ids, language
    )


def tokenize_preference(
    tokenizer,
    pair: PreferencePair,
    max_length: int,
    max_prompt_length: int,
    *,
    add_eos: bool = True,
    use_chat_template: bool | None = None,
) -> TokenizedPair:
    """A preference pair as token ids, truncated by the module's policy (the prompt first)."""
    prompt_ids = tokenize_prompt(tokenizer, pair.prompt, use_chat_template)
    chosen_ids = tokenize_completion(tokenizer, pair.chosen, add_eos)
    rejected_ids = tokenize_completion(tokenizer, pair.rejected, add_eos)
    new_prompt, (new_chosen, new_rejected) = _fit(
        prompt_ids, [chosen_ids, rejected_ids], max_length, max_prompt_length, tokenizer.bos_token_id
    )
    return TokenizedPair(
        new_prompt,
        new_chosen,
        new_rejected,
        prompt_truncated=new_prompt != prompt_ids,
        chosen_truncated=new_chosen != chosen_ids,
        rejected_truncated=new_rejected != rejected_ids,
        language=pair.language,
        chosen_score=pair.chosen_score,
        rejected_score=pair.rejected_score,
    )


def truncation_counts(examples: list[TokenizedExample] | list[TokenizedPair]) -> dict[str, int]:
    """How many examples had each part truncated, e.g. {"prompt_truncated": 3, "chosen_truncated": 1}."""
    names = [f.name for f in fields(examples[0]) if f.name.endswith("_truncated")] if examples else []
    return {name: sum(getattr(example, name) for example in examples) for name in names}


@dataclass(frozen=True)
class PreferenceBatch:
    """A collated batch of preference pairs. chosen and rejected share one width T, so a trainer can run
    them in one forward: torch.cat([chosen_ids, rejected_ids]) with the prompt repeated."""

    prompt_ids: torch.Tensor  # (B, Tp) long, LEFT padded with pad_id
    prompt_mask: torch.Tensor  # (B, Tp) long, 1 on real prompt tokens
    chosen_ids: torch.Tensor  # (B, T) long, RIGHT padded with pad_id
    chosen_mask: torch.Tensor  # (B, T) long, 1 on real chosen tokens (EOS included)
    rejected_ids: torch.Tensor  # (B, T) long, RIGHT padded with pad_id
    rejected_mask: torch.Tensor  # (B, T) long, 1 on real rejected tokens (EOS included)
    language: list[str | None]  # B language codes
    chosen_scores: torch.Tensor | None = None  # (B,) float, when every pair has both scores
    rejected_scores: torch.Tensor | None = None  # (B,) float, when every pair has both scores

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return replace(self, **_tensors_to(self, device))


@dataclass(frozen=True)
class CompletionBatch:
    """A collated batch of prompts with one given completion each (SFT)."""

    prompt_ids: torch.Tensor  # (B, Tp) long, LEFT padded with pad_id
    prompt_mask: torch.Tensor  # (B, Tp) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) long, RIGHT padded with pad_id
    completion_mask: torch.Tensor  # (B, T) long, 1 on real completion tokens (EOS included)
    language: list[str | None]  # B language codes

    def to(self, device: torch.device | str) -> CompletionBatch:
        return replace(self, **_tensors_to(self, device))


def _tensors_to(batch, device) -> dict[str, torch.Tensor]:
    return {
        f.name: v.to(device) for f in fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)
    }


def pad_sequences(
    sequences: list[list[int]], pad_id: int, side: str, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, width) long; `side` "left" or "right" is where the padding goes."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, width)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, width)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start : start + len(seq)] = 1
    return ids, mask


def collate_pairs(examples: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """Pad a list of tokenized pairs into a PreferenceBatch (see its field comments)."""
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompt_ids, prompt_mask = pad_sequences([e.prompt_ids for e in examples], pad_id, "left")
    width = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    chosen_ids, chosen_mask = pad_sequences([e.chosen_ids for e in examples], pad_id, "right", width)
    rejected_ids, rejected_mask = pad_sequences([e.rejected_ids for e in examples], pad_id, "right", width)
    scored = all(e.chosen_score is not None and e.rejected_score is not None for e in examples)
    return PreferenceBatch(
        prompt_ids,
        prompt_mask,
        chosen_ids,
        chosen_mask,
        rejected_ids,
        rejected_mask,
        [e.language for e in examples],
        torch.tensor([e.chosen_score for e in examples], dtype=torch.float32) if scored else None,  # (B,)
        torch.tensor([e.rejected_score for e in examples], dtype=torch.float32) if scored else None,  # (B,)
    )


def collate_sft(examples: list[TokenizedExample], pad_id: int) -> CompletionBatch:
    """Pad a list of tokenized prompt + completion examples into a CompletionBatch."""
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    prompt_ids, prompt_mask = pad_sequences([e.prompt_ids for e in examples], pad_id, "left")
    completion_ids, completion_mask = pad_sequences([e.completion_ids for e in examples], pad_id, "right")
    return CompletionBatch(
        prompt_ids, prompt_mask, completion_ids, completion_mask, [e.language for e in examples]
    )


def tokenize_preferences(
    tokenizer,
    pairs: list[PreferencePair],
    max_length: int,
    max_prompt_length: int,
    *,
    add_eos: bool = True,
    use_chat_template: bool | None = None,
) -> list[TokenizedPair | ValueError]:
    """`tokenize_preference` of every pair (the same ids), from four batched tokenizer calls instead of three
    calls a pair; a pair that cannot be tokenized gets the ValueError `tokenize_preference` would raise."""
    if add_eos and tokenizer.eos_token_id is None:
        return [ValueError("add_eos=True but the tokenizer has no eos_token_id")] * len(pairs)
    rendered: list = []
    for pair in pairs:
        try:
            rendered.append(_render(tokenizer, pair.prompt, use_chat_template))
        except ValueError as exc:
            rendered.append(exc)
    ids = {}
    for templated in (False, True):  # chat-template text already holds its special tokens
        texts = [r[0] for r in rendered if isinstance(r, tuple) and r[1] == templated]
        ids[templated] = iter(_batch_ids(tokenizer, texts, not templated))
    eos = [tokenizer.eos_token_id] if add_eos else []
    chosen = _batch_ids(tokenizer, [p.chosen for p in pairs], False)
    rejected = _batch_ids(tokenizer, [p.rejected for p in pairs], False)
    out: list[TokenizedPair | ValueError] = []
    for pair, r, c, j in zip(pairs, rendered, chosen, rejected):
        if isinstance(r, ValueError):
            out.append(r)
            continue
        text, templated = r
        p, c, j = next(ids[templated]), c + eos, j + eos
        if (
            not templated
            and p
            and p[-1] == tokenizer.eos_token_id
            and not text.endswith(tokenizer.eos_token or "\0")
        ):
            p = p[:-1]  # as in tokenize_prompt
        if not p or not c or not j:
            what = (
                f"prompt {pair.prompt!r:.80}"
                if not p
                else f"completion {(pair.chosen if not c else pair.rejected)!r:.80}"
            )
            out.append(ValueError(f"{what} has no tokens"))
            continue
        new_p, (new_c, new_j) = _fit(p, [c, j], max_length, max_prompt_length, tokenizer.bos_token_id)
        flags = (new_p != p, new_c != c, new_j != j)
        out.append(
            TokenizedPair(new_p, new_c, new_j, *flags, pair.language, pair.chosen_score, pair.rejected_score)
        )
    return out


def _batch_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(
        texts, add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False
    )
    return [list(ids) for ids in encoded["input_ids"]]
