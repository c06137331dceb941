"""polyalign.logprobs against naive unpadded forwards, and padding / temperature invariances."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

from polyalign import logprobs as lp
from polyalign.models import ScoreModel
from tests.conftest import model_atol, tiny_llama_config

PAD = 0

# Real (unpadded) prompt and completion token ids per row; lengths differ on purpose.
PROMPTS = [[1, 45, 67, 89, 12], [1, 300], [1, 77, 78, 79]]
COMPLETIONS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]


def pad(rows: list[list[int]], side: str, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


def batch(prompt_side: str = "left", prompt_width: int | None = None, completion_width: int | None = None):
    return (*pad(PROMPTS, prompt_side, prompt_width), *pad(COMPLETIONS, "right", completion_width))


def naive_logprobs(model, temperature: float = 1.0) -> list[torch.Tensor]:
    """One unpadded full forward per row, log_softmax over the whole vocabulary, then pick the tokens."""
    out = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0] / temperature
        logp = torch.log_softmax(logits.float(), -1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
        out.append(logp[positions, torch.tensor(completion)])
    return out


def assert_matches_rows(result: torch.Tensor, expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    for i, row in enumerate(expected):
        torch.testing.assert_close(result[i, : len(row)], row, atol=atol, rtol=0)
        assert torch.all(result[i, len(row) :] == 0), "padding positions must be exactly 0"


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_matches_naive_unpadded_forward(which, tiny_llama, stories):
    model = tiny_llama if which == "tiny" else stories[0]
    with torch.no_grad():
        result = lp.completion_logprobs(model, *batch())
        expected = naive_logprobs(model)
    assert result.shape == (3, 5)
    assert_matches_rows(result, expected)


def test_left_and_right_prompt_padding_agree(tiny_llama):
    with torch.no_grad():
        left = lp.completion_logprobs(tiny_llama, *batch("left"))
        right = lp.completion_logprobs(tiny_llama, *batch("right"))
    torch.testing.assert_close(left, right, atol=model_atol(right, tiny_llama.config), rtol=0)


def test_extra_padding_changes_nothing(tiny_llama):
    with torch.no_grad():
        tight = lp.completion_logprobs(tiny_llama, *batch("left"))
        wide = lp.completion_logprobs(tiny_llama, *batch("left", prompt_width=9, completion_width=8))
        wide_right = lp.completion_logprobs(tiny_llama, *batch("right", prompt_width=9, completion_width=8))
    atol = model_atol(tight, tiny_llama.config)  # padding changes the float32 summation order only
    torch.testing.assert_close(wide[:, :5], tight, atol=atol, rtol=0)
    torch.testing.assert_close(wide_right[:, :5], tight, atol=atol, rtol=0)
    assert torch.all(wide[:, 5:] == 0)


def test_temperature_divides_logits(tiny_llama):
    with torch.no_grad():
        hot = lp.completion_logprobs(tiny_llama, *batch(), temperature=2.5)
        plain = lp.completion_logprobs(tiny_llama, *batch())
        expected = naive_logprobs(tiny_llama, temperature=2.5)
    assert_matches_rows(hot, expected)
    assert not torch.allclose(hot, plain)
    with pytest.raises(ValueError, match="temperature"):
        lp.completion_logprobs(tiny_llama, *batch(), temperature=0.0)


def test_chunked_head_matches_and_gradients_flow(tiny_llama, monkeypatch):
    tiny_llama.train()
    whole = lp.completion_logprobs(tiny_llama, *batch())
    monkeypatch.setattr(lp, "HEAD_CHUNK_ROWS", 1)
    chunked = lp.completion_logprobs(tiny_llama, *batch())
    torch.testing.assert_close(chunked, whole, atol=model_atol(whole, tiny_llama.config), rtol=0)
    chunked.sum().backward()
    grads = [p.grad for p in tiny_llama.parameters()]
    assert tiny_llama.lm_head.weight.grad.abs().sum() > 0
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_sequence_logprobs_and_entropy(tiny_llama):
    with torch.no_grad():
        per_token, entropy = lp.completion_logprobs_and_entropy(tiny_llama, *batch())
        total = lp.sequence_logprobs(tiny_llama, *batch())
    torch.testing.assert_close(total, per_token.sum(-1))
    # Entropy at the first completion position of row 0, from a naive forward.
    logits = tiny_llama(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].detach()
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy[0, 0], -(probs * probs.log()).sum(), atol=1e-5, rtol=0)
    assert torch.all(entropy[2, 1:] == 0) and torch.all(entropy[:, 0] > 0)


def test_peft_wrapped_model_is_unwrapped(tiny_llama):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        result = lp.completion_logprobs(wrapped, *batch())
        expected = naive_logprobs(wrapped)
    assert_matches_rows(result, expected)


@pytest.mark.parametrize("cls", [LlamaForTokenClassification, LlamaForSequenceClassification, ScoreModel])
def test_value_forward_matches_naive_per_token_head(cls):
    torch.manual_seed(7)
    model = cls(tiny_llama_config(num_labels=1)).eval()
    with torch.no_grad():
        values = lp.value_forward(model, *batch("right", prompt_width=7))
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            hidden = model.base_model(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0]
            expected = model.score(hidden).squeeze(-1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]
            atol = model_atol(expected, model.config)
            torch.testing.assert_close(values[i, : len(completion)], expected, atol=atol, rtol=0)
            assert torch.all(values[i, len(completion) :] == 0)


def test_value_forward_rejects_model_without_score_head(tiny_llama):
    with pytest.raises(ValueError, match="no `score` head"):
        lp.value_forward(tiny_llama, *batch())


def test_bad_shapes_and_empty_prompt_rows_raise(tiny_llama):
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch()
    with pytest.raises(ValueError, match="ids and masks must match"):
        lp.completion_logprobs(tiny_llama, prompt_ids, prompt_mask[:, 1:], completion_ids, completion_mask)
    with pytest.raises(ValueError, match="same batch size"):
        lp.completion_logprobs(tiny_llama, prompt_ids[:2], prompt_mask[:2], completion_ids, completion_mask)
    with pytest.raises(ValueError, match="at least one real prompt token"):
        lp.completion_logprobs(tiny_llama, prompt_ids, prompt_mask * 0, completion_ids, completion_mask)


def test_truncate_at_eos_hand_example():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask = lp.truncate_at_eos(ids, eos_id=2, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    _, mask_multi = lp.truncate_at_eos(ids, eos_id=[7, 2], pad_id=0)
    assert mask_multi.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_left_align_moves_real_tokens_right():
    ids = torch.tensor([[4, 5, 0, 0], [0, 6, 0, 7]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]])
    aligned_ids, aligned_mask = lp.left_align(ids, mask)
    assert aligned_ids[:, 2:].tolist() == [[4, 5], [6, 7]]
    assert aligned_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
