"""Chat message lists in records: validation (`normalize_messages`), ShareGPT turns, and the split of two full
conversations into a shared prompt and two completions. Used by `preference.py` to read records and by
`chat.py` to render prompts; every error is a `DataError` that names the record and the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from polyalign.data.io import DataError, field_error, text_field

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def normalize_messages(value: object, where: str = "messages") -> list[dict[str, str]]:
    """Validated copies of chat messages [{"role": one of ROLES, "content": str}] (other keys dropped).
    `where` prefixes error messages, e.g. "data.jsonl: line 3: field 'prompt'"."""
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of messages, got {type(value).__name__}", "bad_type")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(
                f"{where}, message {i}: expected a 'role' in {ROLES}, got {message!r:.120}", "bad_message"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}, message {i}: 'content' must be a string, got {message!r:.120}", "bad_message"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def sharegpt_to_messages(turns: object, where: str = "conversations") -> list[dict[str, str]]:
    """ShareGPT turns [{"from", "value"}] as chat messages; roles by SHAREGPT_ROLES."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns", "bad_conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not (
            isinstance(turn, dict)
            and turn.get("from") in SHAREGPT_ROLES
            and isinstance(turn.get("value"), str)
        ):
            expected = f"{{'from': one of {sorted(SHAREGPT_ROLES)}, 'value': str}}"
            raise DataError(f"{where}, turn {i}: expected {expected}, got {turn!r:.120}", "bad_conversation")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (strings or message lists)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_conversations(
    prompt: list[dict], chosen: list[dict], rejected: list[dict], where: str, keys: tuple[str, str, str]
) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) from two full conversations: a prompt they both
    repeat is dropped from them, the messages they still share are appended to the prompt, and each
    must then end with exactly one assistant message. `keys` names the (prompt, chosen, rejected) fields
    in errors."""
    chosen = normalize_messages(chosen, f"{where}: field {keys[1]!r}")
    rejected = normalize_messages(rejected, f"{where}: field {keys[2]!r}")
    if prompt and chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    shared = common_prefix_length(chosen, rejected)
    prompt = prompt + chosen[:shared]
    if not prompt:
        raise field_error(where, keys[0], "no prompt messages before the completions", "missing_field")
    texts = []
    for key, tail in ((keys[1], chosen[shared:]), (keys[2], rejected[shared:])):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            problem = (
                f"after the prompt expected one assistant message, got roles {[m['role'] for m in tail]}"
            )
            raise field_error(where, key, problem, "bad_conversation")
        texts.append(text_field(tail[0]["content"], where, key))
    return prompt, texts[0], texts[1]
