"""Prompt rendering, tokenization, truncation and collation (polyalign/data/chat.py) and message checks
(messages.py), with the shipped stories260K tokenizer and a copy of it given a small chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyalign.data.chat import (
    TokenizedExample,
    collate_pairs,
    collate_sft,
    pad_sequences,
    render_prompt,
    tokenize_completion,
    tokenize_pair,
    tokenize_preference,
    tokenize_prompt,
    truncation_counts,
)
from polyalign.data.io import DataError
from polyalign.data.messages import normalize_messages
from polyalign.data.preference import PreferencePair, load_preferences
from tests.conftest import model_atol

STORIES = Path(__file__).parent.parent / "polyalign" / "assets" / "stories260K"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
BOS, EOS = 1, 2
MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_render_prompt_plain_and_template(tok, chat_tok):
    assert render_prompt(tok, "Once upon a time") == "Once upon a time"  # base model: the raw text
    assert render_prompt(tok, MESSAGES) == "\n\nSystem: Be kind.\n\nHuman: Tell me a story.\n\nAssistant:"
    assert render_prompt(chat_tok, MESSAGES) == "<s>system: Be kind.\nuser: Tell me a story.\nassistant:"
    assert render_prompt(chat_tok, "Hi") == "Hi"  # strings use the template only when asked
    assert render_prompt(chat_tok, "Hi", use_chat_template=True) == "<s>user: Hi\nassistant:"
    assert render_prompt(chat_tok, MESSAGES, use_chat_template=False).startswith("\n\nSystem:")
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(tok, "Hi", use_chat_template=True)
    with pytest.raises(DataError, match="message 1"):
        render_prompt(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])


PROMPTS = ["Once upon a ti", "Lily saw a", "Tom was happy.", "你好", "Once upon a time"]
COMPLETIONS = ["me there was a dog.", "big red ball.", " He ran.", "世界", ", a cat sat."]


def test_prompt_tokens_identical_alone_and_with_completion(tok):
    differs_from_joint = 0
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        alone = tokenize_prompt(tok, prompt)
        example = tokenize_pair(tok, prompt, completion, max_length=512, max_prompt_length=256)
        assert example.prompt_ids == alone == tok(prompt)["input_ids"]
        assert alone[0] == BOS and alone.count(BOS) == 1
        assert example.completion_ids == tok(completion, add_special_tokens=False)["input_ids"] + [EOS]
        assert not example.prompt_truncated and not example.completion_truncated
        joint = tok(prompt + completion)["input_ids"]
        differs_from_joint += joint[: len(alone)] != alone
    assert differs_from_joint >= 1  # joint tokenization would have merged across the boundary


def test_prompt_tokens_identical_with_chat_template(chat_tok):
    alone = tokenize_prompt(chat_tok, MESSAGES)
    assert alone.count(BOS) == 1 and alone[0] == BOS  # the template's BOS, no second one added
    assert chat_tok.decode(alone[1:]) == "system: Be kind.\nuser: Tell me a story.\nassistant:"
    example = tokenize_pair(chat_tok, MESSAGES, "Once there was a fox.", 512, 256)
    assert example.prompt_ids == alone
    assert example.completion_ids[-1] == EOS and BOS not in example.completion_ids


def test_completion_eos_is_configurable(tok):
    assert (
        tokenize_completion(tok, "The end.", add_eos=False)
        == tok("The end.", add_special_tokens=False)["input_ids"]
    )
    assert tokenize_completion(tok, "The end.")[-1] == EOS
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_completion(tok, "", add_eos=False)


def test_truncation_keeps_the_prompt_and_cuts_the_completion_from_the_right(tok):
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    completion = "One day, she saw a big ball."
    full_prompt, full_completion = tokenize_prompt(tok, prompt), tokenize_completion(tok, completion)
    max_length = len(full_prompt) + 3
    example = tokenize_pair(tok, prompt, completion, max_length=max_length, max_prompt_length=100)
    assert example.prompt_ids == full_prompt and not example.prompt_truncated  # the whole prompt is kept
    assert example.completion_ids == full_completion[:3] and example.completion_truncated  # the room left
    by_prompt_limit = tokenize_pair(tok, prompt, completion, max_length=512, max_prompt_length=4)
    assert by_prompt_limit.prompt_ids == [BOS] + full_prompt[-3:]  # BOS kept, then the END of the prompt
    assert by_prompt_limit.prompt_truncated and by_prompt_limit.completion_ids == full_completion


def test_a_long_completion_never_pushes_the_prompt_out(tok):
    completion = "Lily and Tom went to the park to play with the big red ball every day."
    full = tokenize_completion(tok, completion)
    prompt_ids = tokenize_prompt(tok, "Once upon a time")
    example = tokenize_pair(tok, "Once upon a time", completion, max_length=8, max_prompt_length=4)
    assert example.prompt_ids == [BOS] + prompt_ids[-3:] and example.prompt_truncated  # 4 prompt tokens
    assert example.completion_ids == full[:4] and example.completion_truncated  # 8 - 4, EOS cut off too
    # max_prompt_length >= max_length: one token is left for the completion
    squeezed = tokenize_pair(tok, "Once upon a time", completion, max_length=3, max_prompt_length=10)
    assert len(squeezed.prompt_ids) == 2 and squeezed.completion_ids == full[:1]
    short = tokenize_pair(
        tok, "Once upon a time", "Hi.", max_length=len(prompt_ids) + 9, max_prompt_length=64
    )
    assert truncation_counts([example, short]) == {"prompt_truncated": 1, "completion_truncated": 1}
    with pytest.raises(ValueError, match="max_length >= 2"):
        tokenize_pair(tok, "a", "b", max_length=1, max_prompt_length=1)


def test_pair_completions_share_the_room_left_by_the_prompt(tok):
    pair = PreferencePair(
        "Once upon a time, there was a little dog named Max.",
        "He ran.",
        "Max liked to run and jump in the big green park.",
        "en",
        "mem",
        0,
        1.0,
        0.0,
    )
    prompt_ids = tokenize_prompt(tok, pair.prompt)
    chosen, rejected = tokenize_completion(tok, pair.chosen), tokenize_completion(tok, pair.rejected)
    example = tokenize_preference(tok, pair, max_length=len(prompt_ids) + len(chosen), max_prompt_length=64)
    assert example.prompt_ids == prompt_ids and example.chosen_ids == chosen
    assert example.rejected_ids == rejected[: len(chosen)]
    assert (example.prompt_truncated, example.chosen_truncated, example.rejected_truncated) == (
        False,
        False,
        True,
    )
    assert (example.language, example.chosen_score, example.rejected_score) == ("en", 1.0, 0.0)


def test_collate_pairs_padding_sides_and_masks(tok):
    pairs = [
        PreferencePair("Once upon a time", "there was a cat.", "no.", "en", "mem", 0, 2.0, 1.0),
        PreferencePair("Tom", "ran.", "Tom ran to the big park with his dog.", "fr", "mem", 1, 0.5, 0.0),
    ]
    examples = [tokenize_preference(tok, p, 64, 32) for p in pairs]
    batch = collate_pairs(examples, pad_id=0)
    lengths = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    width = max(max(c, r) for _, c, r in lengths)
    assert batch.prompt_ids.shape == (2, max(p for p, _, _ in lengths))
    assert batch.chosen_ids.shape == batch.rejected_ids.shape == (2, width)  # one width for both sides
    for i, (example, (p, c, r)) in enumerate(zip(examples, lengths)):
        assert batch.prompt_ids[i, -p:].tolist() == example.prompt_ids  # LEFT padded
        assert batch.prompt_mask[i].tolist() == [0] * (batch.prompt_ids.shape[1] - p) + [1] * p
        assert batch.chosen_ids[i, :c].tolist() == example.chosen_ids  # RIGHT padded
        assert batch.chosen_mask[i].tolist() == [1] * c + [0] * (width - c)
        assert batch.rejected_mask[i].tolist() == [1] * r + [0] * (width - r)
        assert (batch.rejected_ids[i, r:] == 0).all() and (
            batch.prompt_ids[i, : batch.prompt_ids.shape[1] - p] == 0
        ).all()
    assert batch.prompt_ids.dtype == batch.chosen_mask.dtype == torch.long
    assert batch.language == ["en", "fr"]
    assert batch.chosen_scores.tolist() == [2.0, 0.5] and batch.rejected_scores.tolist() == [1.0, 0.0]
    unscored = collate_pairs(
        [examples[0], tokenize_preference(tok, PreferencePair("a", "b", "c", None, "m", 2), 64, 32)], 0
    )
    assert unscored.chosen_scores is None and unscored.language == ["en", None]
    assert collate_pairs(examples, pad_id=7).rejected_ids[0, -1].item() == 7


def test_collate_sft_and_pad_sequences():
    examples = [TokenizedExample([1, 5], [7, 8, 2], language="en"), TokenizedExample([1], [9, 2])]
    batch = collate_sft(examples, pad_id=0)
    assert batch.prompt_ids.tolist() == [[1, 5], [0, 1]] and batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.completion_ids.tolist() == [[7, 8, 2], [9, 2, 0]]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.language == ["en", None]
    assert batch.to("cpu").completion_ids.tolist() == batch.completion_ids.tolist()
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], 0, "middle")
    with pytest.raises(ValueError, match="at least one"):
        collate_sft([], 0)


def test_normalize_messages_drops_extra_keys_and_checks_content():
    assert normalize_messages([{"role": "user", "content": "x", "name": "n"}]) == [
        {"role": "user", "content": "x"}
    ]
    with pytest.raises(DataError, match="'content' must be a string"):
        normalize_messages([{"role": "user", "content": None}])


def test_collated_demo_batch_feeds_completion_logprobs(tok):
    """A padded batch gives each row the same log-probs as that row alone (padding is inert)."""
    logprobs = pytest.importorskip("polyalign.logprobs")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    pairs = load_preferences("builtin:dpo-demo-en")[:3]
    examples = [tokenize_preference(tok, p, max_length=48, max_prompt_length=24) for p in pairs]
    batch = collate_pairs(examples, pad_id=0)
    with torch.no_grad():
        together = logprobs.completion_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask
        )
        for i, example in enumerate(examples):
            one = collate_pairs([example], pad_id=0)
            alone = logprobs.completion_logprobs(
                model, one.prompt_ids, one.prompt_mask, one.chosen_ids, one.chosen_mask
            )
            n = len(example.chosen_ids)
            atol = model_atol(alone, model.config)  # batch shapes change the float32 summation order
            torch.testing.assert_close(together[i, :n], alone[0, :n], atol=atol, rtol=0)
            assert (together[i, n:] == 0).all()


USER_ONLY = (  # drops every system turn without a word, like some older chat templates
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
)


@pytest.mark.parametrize("template", [USER_ONLY, NO_SYSTEM + TEMPLATE], ids=["drops", "raises"])
def test_template_without_system_role_gets_it_in_the_first_user_turn(template):
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.chat_template = template
    merged = "<s>user: Be kind.\n\nTell me a story.\nassistant:"
    assert render_prompt(tokenizer, MESSAGES) == merged
    # The system text also inside the user turn does not count as kept.
    echo = [MESSAGES[0], {"role": "user", "content": "Be kind."}]
    assert render_prompt(tokenizer, echo) == "<s>user: Be kind.\n\nBe kind.\nassistant:"
    # A system turn alone becomes the user turn; without a system turn nothing changes.
    assert render_prompt(tokenizer, MESSAGES[:1]) == "<s>user: Be kind.\nassistant:"
    assert render_prompt(tokenizer, MESSAGES[1:]) == "<s>user: Tell me a story.\nassistant:"


def test_template_with_system_role_is_left_alone(chat_tok):
    assert render_prompt(chat_tok, MESSAGES) == "<s>system: Be kind.\nuser: Tell me a story.\nassistant:"
