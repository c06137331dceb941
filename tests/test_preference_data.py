"""Preference data loading (polyalign/data/preference.py) and record io (polyalign/data/io.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from polyalign.data.io import DataError, JsonlWriter, read_records, read_table
from polyalign.data.preference import (
    Columns,
    ScoredCompletion,
    detect_format,
    iter_preferences,
    load_preferences,
    load_scored,
    pairs_from_scored,
)
from polyalign.files import write_jsonl_atomic

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DEMO = Path(__file__).parent.parent / "polyalign" / "assets" / "dpo_demo"


def write_lines(path: Path, rows: list) -> Path:
    """Each row: a dict (dumped as JSON) or a raw string line."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return path


# ---------------------------------------------------------------- formats


def test_pairs_jsonl_strings_messages_and_scores():
    pairs = load_preferences(FIXTURES / "pairs.jsonl")
    assert len(pairs) == 5
    first = pairs[0]
    assert (first.prompt, first.chosen, first.rejected) == (
        "Once upon a time, there was a cat.",
        " The cat liked to play in the sun.",
        " The cat cat cat.",
    )
    assert (first.language, first.chosen_score, first.rejected_score, first.row) == ("en", 0.9, 0.1, 0)
    assert first.source == str(FIXTURES / "pairs.jsonl")
    assert pairs[1].chosen_score is None and pairs[1].language == "en"
    assert (pairs[2].chosen_score, pairs[2].rejected_score, pairs[2].language) == (
        0.5,
        -1.0,
        "fr",
    )  # strings parsed
    assert pairs[3].prompt == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "写一个故事。"},
    ]
    assert pairs[3].chosen == "从前有一只小猫。"
    # empty prompt + full conversations: the shared prefix becomes the prompt
    assert pairs[4].prompt == [{"role": "user", "content": "Say hi."}]
    assert (pairs[4].chosen, pairs[4].rejected, pairs[4].language) == ("Hi there!", "No.", None)
    assert [p.row for p in pairs] == [0, 1, 2, 3, 4]


def test_default_language_fills_missing_values_only():
    pairs = load_preferences(FIXTURES / "pairs.jsonl", language="xx")
    assert [p.language for p in pairs] == ["en", "en", "fr", "zh", "xx"]


def test_json_object_by_split_with_repeated_prompt_and_multi_turn_prefix():
    pairs = load_preferences(FIXTURES / "pairs_messages.json")  # split="train" picks the "train" list
    assert len(pairs) == 2
    assert pairs[0].prompt == [
        {"role": "user", "content": "What is 2+2?"}
    ]  # string prompt repeated in chosen
    assert (pairs[0].chosen, pairs[0].rejected) == ("4", "5")
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user", "assistant", "user"]
    assert pairs[1].chosen == "Blue." and pairs[1].rejected.startswith("I like many colors")
    test = load_preferences(FIXTURES / "pairs_messages.json", split="test")
    assert [(p.prompt, p.chosen, p.rejected) for p in test] == [("x", "a", "b")]


def test_hh_prefix_split_by_hand():
    pairs = load_preferences(FIXTURES / "hh.jsonl")
    assert [detect_format(r) for r in read_records(FIXTURES / "hh.jsonl")] == ["hh", "hh"]
    assert pairs[0].prompt == "\n\nHuman: What is a cat?\n\nAssistant:"
    assert (pairs[0].chosen, pairs[0].rejected) == (" A cat is a small furry animal.", " A dog.")
    # multi-turn, and the two answers share their first word: the cut is at the last shared marker
    assert (
        pairs[1].prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant:"
    )
    assert pairs[1].chosen == " I think you mix flour, water and yeast, then bake it."
    assert pairs[1].rejected == " I don't know."
    for pair, row in zip(pairs, read_records(FIXTURES / "hh.jsonl")):
        assert pair.prompt + pair.chosen == row["chosen"] and pair.prompt + pair.rejected == row["rejected"]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_shipped_sharegpt_demo(language):
    report, pairs = iter_preferences(f"builtin:dpo-demo-{language}")
    pairs = list(pairs)
    raw = json.loads((DEMO / f"dpo_{language}_demo.json").read_text(encoding="utf-8"))
    assert len(pairs) == len(raw) == 300 and report.fmt == "sharegpt" and report.skipped == {}
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for pair, row in zip(pairs, raw):
        assert pair.language == language
        assert pair.prompt == [
            {"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]
        ]
        assert (pair.chosen, pair.rejected) == (row["chosen"]["value"], row["rejected"]["value"])
    if language == "zh":
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in p.prompt[-1]["content"]) for p in pairs)
    assert sum(len(p.prompt) > 1 for p in pairs) > 0  # multi-turn / system conversations are kept


def test_sharegpt_file_path_detected_automatically():
    pairs = load_preferences(DEMO / "dpo_en_demo.json")
    assert len(pairs) == 300 and pairs[0].language is None


def test_scored_csv_and_pairing_through_load_preferences():
    scored = load_scored(FIXTURES / "scored.csv")
    assert [s.reward for s in scored] == [1.0, -0.5, 2.0, 0.75, 0.25, 0.0]
    assert [s.language for s in scored] == ["en", "en", "en", "es", "es", None]
    assert scored[5].prompt == "A prompt with, a comma\nand a newline"
    table = read_table(FIXTURES / "scored.csv")
    assert table.locations == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7"]
    pairs = load_preferences(FIXTURES / "scored.csv")  # auto -> scored -> best_worst
    assert [(p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        ("A frog jumped, and everyone laughed.", "Frog.", 2.0, -0.5),
        ("Había una vez una rana.", "Rana.", 0.75, 0.25),
    ]
    assert [p.row for p in pairs] == [2, 3]
    assert len(load_preferences(FIXTURES / "scored.csv", strategy="all_pairs")) == 3 + 1


def test_pairs_csv_and_parquet_match_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = read_records(FIXTURES / "pairs.jsonl")[:3]
    for row in rows:  # one column type per column for Parquet
        row["chosen_score"] = float(row.get("chosen_score", "nan"))
        row["rejected_score"] = float(row.get("rejected_score", "nan"))
    rows[1]["chosen_score"] = rows[1]["rejected_score"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    columns = ["prompt", "chosen", "rejected", "language", "chosen_score", "rejected_score"]
    lines = [",".join(columns)] + [
        ",".join(f'"{r[c]}"' if r[c] is not None else "" for c in columns) for r in rows
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = load_preferences(FIXTURES / "pairs.jsonl")[:3]
    for name in ("pairs.parquet", "pairs.csv"):
        got = load_preferences(tmp_path / name)
        assert [p.chosen_score for p in got] == [0.9, None, 0.5]
        assert [(p.prompt, p.chosen, p.rejected, p.language, p.rejected_score) for p in got] == [
            (p.prompt, p.chosen, p.rejected, p.language, p.rejected_score) for p in expected
        ]


def test_custom_column_names(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"question": "Q?", "good": "yes", "bad": "no", "lang": "de"}])
    with pytest.raises(DataError, match=r"columns found: \['bad', 'good', 'lang', 'question'\]"):
        load_preferences(path)
    (pair,) = load_preferences(
        path, columns=Columns(prompt="question", chosen="good", rejected="bad", language="lang")
    )
    assert (pair.prompt, pair.chosen, pair.rejected, pair.language) == ("Q?", "yes", "no", "de")


# ---------------------------------------------------------------- scored -> pairs


def _scored(prompt: str, items: list[tuple[str, float]], start: int = 0) -> list[ScoredCompletion]:
    return [ScoredCompletion(prompt, text, r, "en", "mem", start + i) for i, (text, r) in enumerate(items)]


GROUPS = (
    _scored("A", [("a1", 1.0), ("a2", 3.0), ("a3", 2.0), ("a4", 0.0)], 0)  # 4 distinct rewards
    + _scored("B", [("b1", 1.0), ("b2", 1.0), ("b3", 0.5)], 4)  # a tie
    + _scored("C", [("c1", 5.0)], 7)  # a single completion: no pair
    + _scored("D", [("d1", 2.0), ("d2", 2.0)], 8)  # all equal: a CoPG pair, no DPO pair
    + _scored("E", [("same", 1.0), ("same", 0.0)], 10)  # identical texts: no pair at all
)


@pytest.mark.parametrize(
    "strategy, expected",
    [("all_pairs", 6 + 3 + 0 + 1 + 0), ("random_pairs", 2 + 1 + 0 + 1 + 0), ("best_worst", 2)],
)
def test_pairs_from_scored_counts(strategy, expected):
    pairs = pairs_from_scored(GROUPS, strategy, seed=0)
    assert len(pairs) == expected
    assert all(p.chosen_score >= p.rejected_score and p.chosen != p.rejected for p in pairs)
    assert all(p.chosen[0] == p.rejected[0] for p in pairs)  # never across prompts


def test_best_worst_picks_extremes_and_all_pairs_keeps_ties():
    best_worst = pairs_from_scored(GROUPS, "best_worst")
    assert [(p.chosen, p.rejected) for p in best_worst] == [("a2", "a4"), ("b1", "b3")]
    assert [p.row for p in best_worst] == [1, 4]
    ties = [p for p in pairs_from_scored(GROUPS, "all_pairs") if p.chosen_score == p.rejected_score]
    assert [(p.chosen, p.rejected) for p in ties] == [("b1", "b2"), ("d1", "d2")]  # earlier row first


def test_random_pairs_disjoint_and_seeded():
    group = _scored("P", [(f"y{i}", float(i)) for i in range(6)])
    pairings = {
        tuple(sorted((p.chosen, p.rejected) for p in pairs_from_scored(group, "random_pairs", s)))
        for s in range(10)
    }
    assert len(pairings) > 1  # the seed changes the pairing
    for seed in range(3):
        pairs = pairs_from_scored(group, "random_pairs", seed)
        assert pairs == pairs_from_scored(group, "random_pairs", seed)
        used = [t for p in pairs for t in (p.chosen, p.rejected)]
        assert sorted(used) == [f"y{i}" for i in range(6)]  # each completion exactly once


def test_unknown_strategy_and_format():
    with pytest.raises(ValueError, match="best_worst"):
        pairs_from_scored(GROUPS, "best")
    with pytest.raises(ValueError, match="unknown preference format 'dpo'"):
        load_preferences(FIXTURES / "pairs.jsonl", fmt="dpo")
    with pytest.raises(ValueError, match="builtin:dpo-demo-en"):
        load_preferences("builtin:nope")


# ---------------------------------------------------------------- validation


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_CASES = {
    "missing column": ({"prompt": "p", "chosen": "a"}, "field 'rejected': missing"),
    "misnamed column": ({"prompt": "p", "chosen": "a", "rejectd": "b"}, "field 'rejected': missing"),
    "non-string completion": (
        {"prompt": "p", "chosen": 5, "rejected": "b"},
        "field 'chosen': expected a string, got int",
    ),
    "empty completion": (
        {"prompt": "p", "chosen": "a", "rejected": "  "},
        "field 'rejected': empty completion",
    ),
    "chosen == rejected": (
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        "field 'chosen': chosen and rejected",
    ),
    "prompt type": (
        {"prompt": 3, "chosen": "a", "rejected": "b"},
        "field 'prompt': expected a string or a message list",
    ),
    "bad message": (
        {"prompt": [{"content": "hi"}], "chosen": "a", "rejected": "b"},
        "field 'prompt', message 0",
    ),
    "bad score": ({**GOOD, "chosen_score": "high"}, "field 'chosen_score': expected a number"),
    "language type": ({**GOOD, "language": 7}, "field 'language'"),
    "conversation tail": (
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}],
        },
        "field 'rejected': after the prompt expected one assistant message, got roles []",
    ),
    "malformed json": ('{"prompt": "p", "chosen": ', "line 2: malformed JSON record"),
    "not an object": ("[1, 2]", "line 2: malformed JSON record: expected a JSON object"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_names_file_line_and_field(tmp_path, case):
    bad, message = BAD_CASES[case]
    path = write_lines(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(path) in str(info.value)
    assert "line 2" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        (
            "hh",
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            "share no",
        ),
        (
            "hh",
            {
                "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d",
            },
            "continues past the final assistant turn",
        ),
        (
            "sharegpt",
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "chosen": {"from": "gpt", "value": "x"},
                "rejected": {"from": "gpt", "value": "y"},
            },
            "field 'conversations[1]': the last turn must be from 'human'",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "robot", "value": "q"}], "chosen": "x", "rejected": "y"},
            "field 'conversations', turn 0",
        ),
        (
            "sharegpt",
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "human", "value": "x"},
                "rejected": "y",
            },
            "field 'chosen': expected a 'gpt' turn",
        ),
        ("scored", {"prompt": "p", "completion": "c", "reward": None}, "field 'reward': missing value"),
        (
            "scored",
            {"prompt": "p", "completion": "c", "reward": float("nan")},
            "field 'reward': not a finite",
        ),
        ("scored", {"prompt": "p", "completion": "c", "reward": True}, "field 'reward': expected a number"),
    ],
)
def test_bad_rows_other_formats(tmp_path, fmt, row, message):
    path = write_lines(tmp_path / "data.jsonl", ["", json.dumps(row)])  # a blank line, then the row at line 2
    with pytest.raises(DataError, match="line 2") as info:
        load_preferences(path, fmt=fmt)
    assert str(path) in str(info.value) and message in str(info.value)


def test_bad_rows_in_json_csv_and_detection(tmp_path):
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([GOOD, {"prompt": "p", "chosen": "", "rejected": "b"}]))
    with pytest.raises(DataError, match=r"d.json: row 1: field 'chosen': empty completion"):
        load_preferences(json_path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion,reward\np,c,1\np,d,abc\n")
    with pytest.raises(DataError, match=r"d.csv: line 3: field 'reward': expected a number, got 'abc'"):
        load_scored(csv_path)
    csv_path.write_text("prompt,completion,reward\np,c,1\np,d\n")
    with pytest.raises(DataError, match=r"d.csv: line 3: expected 3 comma-separated fields"):
        load_scored(csv_path)
    odd = write_lines(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError, match=r"odd.jsonl: cannot detect .* columns found: \['label', 'text'\]"):
        load_preferences(odd)
    with pytest.raises(DataError, match="no records"):
        load_preferences(write_lines(tmp_path / "empty.jsonl", []))


def test_skip_policy_counts_reasons(tmp_path):
    rows = [
        GOOD,
        '{"broken',
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {**GOOD, "rejected": "\n"},
        {**GOOD, "rejected": "a"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
        {"prompt": "r", "chosen": "e", "rejected": "f"},
    ]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match="line 2"):
        load_preferences(path)
    report, pairs = iter_preferences(path, on_error="skip")
    assert report.rows == 0, "the report fills in as the rows are read"
    pairs = list(pairs)
    assert [p.prompt for p in pairs] == ["p", "q", "r"]
    assert [p.row for p in pairs] == [0, 5, 6]  # record index among the parsed records
    assert report.skipped == {
        "malformed_json": 1,
        "missing_field": 1,
        "empty_completion": 2,
        "chosen_equals_rejected": 1,
    }
    assert (report.rows, report.loaded) == (7, 3)
    assert "line 3" in report.examples[0] and len(report.examples) == 4
    with pytest.warns(UserWarning, match=r"loaded 3 of 7 rows; skipped: chosen_equals_rejected=1"):
        assert len(load_preferences(path, on_error="skip")) == 3
    with pytest.raises(ValueError, match="on_error"):
        load_preferences(path, on_error="ignore")


# ---------------------------------------------------------------- io


def test_read_records_json_object_keys(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"meta": {"n": 1}, "rows": [{"a": 1}]}))
    assert read_records(path) == [{"a": 1}]  # the only list
    path.write_text(json.dumps({"x": [{"a": 1}], "y": [{"a": 2}]}))
    with pytest.raises(DataError, match=r"list keys \['x', 'y'\]; pass key="):
        read_records(path)
    assert read_records(path, key="y") == [{"a": 2}]
    path.write_text('[{"a": 1},\n {"a": 2,}]')
    with pytest.raises(DataError, match="o.json: line 2: malformed JSON"):
        read_records(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_records(write_lines(tmp_path / "data.txt", ["x"]))


def test_read_records_skip_warns_with_count(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [{"a": 1}, "{", "", "nope", {"a": 2}])
    with pytest.warns(UserWarning, match=r"skipped 2 malformed line\(s\): \[2, 4\]"):
        assert read_records(path, on_error="skip") == [{"a": 1}, {"a": 2}]
    assert read_table(path, on_error="skip").locations == ["line 1", "line 5"]


def test_write_jsonl_atomic_roundtrip_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records = [{"text": "你好\nworld", "n": 1}, {"text": "b", "n": 2}]
    assert write_jsonl_atomic(path, records) == 2
    assert read_records(path) == records and len(path.read_text(encoding="utf-8").splitlines()) == 2
    with pytest.raises(TypeError, match="record 1 is not JSON-serialisable"):
        write_jsonl_atomic(path, [{"ok": 1}, {"bad": object()}])
    assert read_records(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temporary file left


def test_jsonl_writer_appends_and_trims_partial_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlWriter(path) as writer:
        assert writer.write([{"i": 0}, {"i": 1}]) == 2
        writer.write([{"i": 2}])
        assert writer.written == 3
    with path.open("a") as f:
        f.write('{"i": 3, "tr')  # a crash mid-record
    with JsonlWriter(path) as writer:
        assert writer.dropped_bytes == len('{"i": 3, "tr')
        writer.write([{"i": 3}])
    assert read_records(path) == [{"i": i} for i in range(4)]
    with JsonlWriter(path, append=False) as writer:
        writer.write([{"i": 9}])
    assert read_records(path) == [{"i": 9}]


def test_hf_branch_uses_datasets(monkeypatch, tmp_path):
    calls = []

    class FakeDataset:
        def __init__(self, rows):
            self.rows = rows

        def to_list(self):
            return self.rows

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset([{"prompt": "p", "chosen": "a", "rejected": "b"}])

    class FakeDict(dict):
        pass

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    fake = types.SimpleNamespace(
        load_dataset=load_dataset,
        load_from_disk=lambda path: FakeDict(test=FakeDataset([{"x": path}])),
        DatasetDict=FakeDict,
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (pair,) = load_preferences("org/prefs", split="validation")
    assert calls == [("org/prefs", "validation")] and (pair.source, pair.row) == ("org/prefs", 0)
    assert read_records(saved, split="test") == [{"x": str(saved)}]
    with pytest.raises(KeyError, match=r"no split 'train'; splits: \['test'\]"):
        read_records(saved)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        read_records("org/prefs")
