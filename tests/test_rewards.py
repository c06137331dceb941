"""Reward contract (validation, combination, spec building), rule rewards, and the sentiment data loader."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from polyalign.recipes.sentiment_data import (
    SOURCES,
    LabelledSentence,
    build_pairs,
    load_sentiment,
    parse_sentiment_file,
    split_sentiment,
)
from polyalign.rewards import REWARDS, RewardError, build_reward, check_scores, combine, score_all
from polyalign.rewards.rules import (
    contains_any,
    exact_match,
    length_penalty,
    length_reward,
    lexicon_score,
    lexicon_sentiment,
)

PROMPTS = ["Q1", "Q2", "Q3"]
COMPLETIONS = ["a", "bb", "ccc"]


def const(values):
    return lambda prompts, completions, **cols: torch.tensor(values, dtype=torch.float32)


# ---- contract validation ----------------------------------------------------------------------------


def test_raising_reward_is_reported_with_its_name():
    def broken(prompts, completions, **cols):
        raise KeyError("no such column")

    with pytest.raises(RewardError, match=r"reward function my_rule raised KeyError.*no such column"):
        score_all({"ok": const([1.0, 2.0, 3.0]), "my_rule": broken}, None, PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2), "returned 2 values for 3 completions"),
        ([0.0, 1.0], "returned 2 values for 3 completions"),
        (torch.zeros(3, 1), r"returned a tensor of shape \(3, 1\); expected \(3,\)"),
        ({"a": 1.0}, r"returned dict; expected 3 floats"),
        ([0.0, "1.0", 2.0], "returned a non-number at row 1: '1.0'"),
        ([0.0, 1.0, None], "returned a non-number at row 2: None"),
        (torch.zeros(3, dtype=torch.complex64), "returned a tensor of dtype torch.complex64"),
    ],
)
def test_wrong_length_shape_or_type_names_the_function(bad, message):
    with pytest.raises(ValueError, match=rf"^reward function shape_rule {message}"):
        score_all({"shape_rule": lambda p, c, **k: bad}, None, PROMPTS, COMPLETIONS)


def list_reward(prompts, completions, **columns):
    return [1.0, 2.0, 3.0]  # TRL's contract: a list of floats; three, whatever the number of completions


def test_list_of_floats_is_accepted_and_its_length_checked():
    """TRL's list[float] works like a tensor; a wrong length names the function by its spec."""
    fns = {"tests.test_rewards:list_reward": build_reward("tests.test_rewards:list_reward")}
    total, parts = score_all(fns, None, PROMPTS, COMPLETIONS)
    assert (
        total.tolist() == [1.0, 2.0, 3.0] and parts["tests.test_rewards:list_reward"].dtype == torch.float32
    )
    assert check_scores([1, True, 0.5], 3, "mixed").tolist() == [1.0, 1.0, 0.5]  # ints and bools are numbers
    message = "reward function tests.test_rewards:list_reward returned 3 values for 4 completions"
    with pytest.raises(ValueError, match=message):
        score_all(fns, None, PROMPTS + ["Q4"], COMPLETIONS + ["dddd"])


@pytest.mark.parametrize(
    "values", [[1.0, float("nan"), float("inf")], torch.tensor([1.0, float("nan"), -math.inf])]
)
def test_nan_and_inf_name_function_and_rows(values):
    with pytest.raises(ValueError, match=r"reward function nan_rule returned NaN/Inf at rows \[1, 2\]"):
        score_all({"nan_rule": lambda p, c, **k: values}, None, PROMPTS, COMPLETIONS)


def test_check_scores_converts_ints():
    out = check_scores(torch.tensor([1, 0, 2]), 3, "ints")
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 2.0]


def test_prompt_and_column_lengths_are_checked():
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        score_all({"r": const([0.0, 0.0, 0.0])}, None, PROMPTS[:2], COMPLETIONS)
    with pytest.raises(ValueError, match="column 'answer'.*length 3.*length 1"):
        score_all({"r": const([0.0, 0.0, 0.0])}, None, PROMPTS, COMPLETIONS, answer=["x"])


# ---- combination ----------------------------------------------------------------------------------


def test_score_all_weighted_sum_and_raw_components():
    fns = {"a": const([1.0, 2.0, 3.0]), "b": const([10.0, 0.0, -10.0])}
    total, parts = score_all(fns, {"a": 2.0, "b": 0.5}, PROMPTS, COMPLETIONS)
    # 2*[1,2,3] + 0.5*[10,0,-10] = [7, 4, 1]
    assert total.tolist() == [7.0, 4.0, 1.0]
    assert parts["a"].tolist() == [1.0, 2.0, 3.0] and parts["b"].tolist() == [10.0, 0.0, -10.0]
    assert combine(fns, {"a": 2.0, "b": 0.5})(PROMPTS, COMPLETIONS).tolist() == [7.0, 4.0, 1.0]
    assert combine(fns)(PROMPTS, COMPLETIONS).tolist() == [11.0, 2.0, -7.0]  # weights default to 1


def test_weights_must_match_rewards():
    fns = {"a": const([1.0, 2.0, 3.0])}
    with pytest.raises(ValueError, match=r"missing \[\].*unknown \['b'\]"):
        combine(fns, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"missing \['a'\]"):
        score_all(fns, {}, PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="weight of reward 'a'"):
        combine(fns, {"a": float("nan")})


def test_columns_reach_reward_functions():
    fn = combine({"em": exact_match()}, {"em": 1.0})
    assert fn(PROMPTS, ["Paris", "x", "4"], answer=["paris.", "y", " 4 "]).tolist() == [1.0, 0.0, 1.0]


# ---- building from specs ----------------------------------------------------------------------------


def user_reward(prompts, completions, **columns):
    return torch.tensor([float(len(c)) for c in completions])


def user_factory(scale: float):
    return lambda prompts, completions, **columns: torch.full((len(completions),), scale)


def test_build_reward_builtin_import_path_and_errors():
    assert set(REWARDS) >= {
        "exact_match",
        "contains_any",
        "length_reward",
        "length_penalty",
        "lexicon_sentiment",
    }
    assert build_reward("length_penalty", max_chars=1, per_char=1.0)(PROMPTS, COMPLETIONS).tolist() == [
        0,
        -1,
        -2,
    ]
    assert build_reward("tests.test_rewards:user_reward")(PROMPTS, COMPLETIONS).tolist() == [1.0, 2.0, 3.0]
    assert (
        build_reward("tests.test_rewards:user_factory", scale=0.5)(PROMPTS, COMPLETIONS).tolist() == [0.5] * 3
    )
    with pytest.raises(ValueError, match=r"reward 'contains_any': bad arguments.*words"):
        build_reward("contains_any")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_reward("tests.test_rewards:missing")


# ---- rules ---------------------------------------------------------------------------------------


def test_exact_match_normalisation_and_missing_column():
    fn = exact_match()
    out = fn(["q"] * 4, ["  The Answer. ", "42", "4 2", "yes"], answer=["the answer", "42", "42", "no"])
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert exact_match(normalize=False)(["q"], ["Yes"], answer=["yes"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="needs column 'answer'.*got columns \\['label'\\]"):
        fn(["q"], ["x"], label=["x"])


def test_contains_any_whole_words():
    fn = contains_any(["dog", "red ball"])
    out = fn(["p"] * 4, ["A Dog ran.", "hotdog", "the red ball", "a red balloon"])
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert contains_any(["Dog"], case_sensitive=True)(["p"], ["dog"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="non-empty"):
        contains_any([])


def test_length_reward_and_penalty():
    # target 4: len 4 -> 0, len 2 -> -2/4, len 8 -> -4/4
    assert length_reward(4)(["p"] * 3, ["abcd", "ab", "abcdefgh"]).tolist() == [0.0, -0.5, -1.0]
    # max 3, 0.5 per extra char: len 2 -> 0, len 5 -> -1
    assert length_penalty(3, 0.5)(["p"] * 2, ["ab", "abcde"]).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError):
        length_reward(0)


def test_lexicon_sentiment_hand_examples():
    assert lexicon_score("Lily was happy.") == pytest.approx(0.5)  # 1 pos: 1/2
    assert lexicon_score("happy and kind") == pytest.approx(2 / 3)
    assert lexicon_score("He was sad and cried.") == pytest.approx(-2 / 3)
    assert lexicon_score("She was not happy.") == pytest.approx(-0.5)  # negation flips
    assert lexicon_score("The ball is red.") == 0.0
    out = lexicon_sentiment()(["p"] * 2, ["a lovely, wonderful day", "an awful, terrible day"])
    assert out[0] > 0 > out[1]


# ---- sentiment data ---------------------------------------------------------------------------------


def test_loader_reads_shipped_files():
    data = load_sentiment()
    assert len(data) == 3000
    counts = Counter((s.source, s.label) for s in data)
    assert set(counts.values()) == {500} and {s for s, _ in counts} == set(SOURCES)
    assert all(s.text == s.text.strip() and s.text for s in data)


@pytest.mark.parametrize(
    "line, message",
    [
        ("no tab here 1\n", "expected .sentence<TAB>label., found no tab"),
        ("some text\t2\n", "label must be 0 or 1, got '2'"),
        ("   \t1\n", "empty sentence"),
    ],
)
def test_loader_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "toy_labelled.txt"
    path.write_text("good one\t1\n\nbad one  \t0\n" + line, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"toy_labelled\.txt:4: {message}"):
        parse_sentiment_file(path)


def test_loader_splits_on_last_tab(tmp_path):
    path = tmp_path / "x_labelled.txt"
    path.write_text("a\tb  \t1\n", encoding="utf-8")
    assert parse_sentiment_file(path) == [LabelledSentence("a\tb", 1, "x")]
    with pytest.raises(FileNotFoundError, match="sentiment source 'nope'"):
        load_sentiment(["nope"])


def test_split_is_deterministic_stratified_and_disjoint():
    data = load_sentiment()
    a, b, c = split_sentiment(data, seed=0), split_sentiment(data, seed=0), split_sentiment(data, seed=1)
    assert a == b and a["test"] != c["test"]
    assert [len(a[k]) for k in ("train", "val", "test")] == [2400, 300, 300]
    for name, part in a.items():
        counts = Counter((s.source, s.label) for s in part)
        expected = {"train": 400, "val": 50, "test": 50}[name]
        assert set(counts.values()) == {expected}, (name, counts)
    # A partition: every sentence lands in exactly one split (multiset equality, duplicates included).
    assert Counter(a["train"] + a["val"] + a["test"]) == Counter(data)


def test_build_pairs_positive_chosen_seeded():
    data = [LabelledSentence(f"pos{i}", 1, "s") for i in range(5)] + [
        LabelledSentence(f"neg{i}", 0, "s") for i in range(3)
    ]
    pairs = build_pairs(data, seed=0)
    assert len(pairs) == 3 and all(c.startswith("pos") and r.startswith("neg") for c, r in pairs)
    assert len({c for c, _ in pairs}) == 3 and {r for _, r in pairs} == {"neg0", "neg1", "neg2"}
    assert pairs == build_pairs(data, seed=0)
    assert any(build_pairs(data, seed=s) != pairs for s in range(1, 5))
    with pytest.raises(ValueError, match="need both labels"):
        build_pairs(data[:5])
