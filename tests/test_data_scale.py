"""Offline data at scale: batched tokenization equals the per-pair path, the int32 pair store reads back the
same pairs, the tokens cache is reused only for the same file/tokenizer/settings, the held-out split by prompt
keys equals the split of pair lists, and the reference precompute covers exactly the rows a run reads, with a
cache that a second run (or a resumed one) does not recompute. stories260K and its tokenizer throughout."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import polyalign.train.offline_data as offline_data
import polyalign.train.offline_run as offline_run
from polyalign.config_offline import load_offline_config
from polyalign.data.chat import tokenize_preference, tokenize_preferences
from polyalign.data.io import DataError, iter_table
from polyalign.data.preference import PreferencePair
from polyalign.models import resolve_model_path
from polyalign.train.offline_data import (
    PairSet,
    batch_indices,
    build_pair_sets,
    rows_used,
    split_by_prompt,
    split_rows,
)

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("stories260K"))


def pair(prompt, chosen=" He ran home.", rejected=" She sat.", i=0, **extra):
    return PreferencePair(
        prompt, chosen, rejected, extra.get("language"), "s.jsonl", i, *extra.get("scores", ())
    )


PAIRS = [
    pair("Once upon a time, Tom"),
    pair("A long prompt " * 30, " and a long completion " * 20, " short", language="en", scores=(1.0, -0.5)),
    pair([{"role": "user", "content": "Tell me a story."}], " Once there was a dog.", " No."),
    pair(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], " Hello!", " Go away."
    ),
    pair("Same", " identical tail xx yy zz", " identical tail xx yy qq"),  # identical once truncated
]


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "chat-template"])
@pytest.mark.parametrize("use", [None, False])
def test_batched_tokenization_equals_the_per_pair_path(tok, template, use):
    tok.chat_template = template
    try:
        batched = tokenize_preferences(tok, PAIRS, 24, 12, use_chat_template=use)
        assert batched == [tokenize_preference(tok, p, 24, 12, use_chat_template=use) for p in PAIRS]
        assert batched[1].prompt_truncated and batched[1].chosen_truncated and not batched[0].chosen_truncated
        with pytest.raises(ValueError, match="no chat_template") if template is None else _nothing():
            tokenize_preference(tok, PAIRS[0], 24, 12, use_chat_template=True)
        errors = tokenize_preferences(tok, PAIRS[:1], 24, 12, use_chat_template=True)
        assert isinstance(errors[0], ValueError) == (template is None)
    finally:
        tok.chat_template = None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def toy_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"Story {i // 2}: once upon a time, Tom",  # two pairs per prompt
            "chosen": " was good and happy and kind." + " very" * (i % 7),
            "rejected": " was bad and sad and mean.",
            "language": ("en", "de", None)[i % 3],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg_for(tmp_path, data, *extra):
    return load_offline_config(
        None,
        [
            f"--data.train={data}",
            "--data.max_length=24",
            "--data.max_prompt_length=12",
            "--data.eval_fraction=0.1",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--output.run_dir={tmp_path / 'run'}",
            "--train.steps=3",
            "--train.batch_size=4",
            *extra,
        ],
    )


def test_pair_store_reads_back_the_tokenized_pairs_and_counts_the_whole_file(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(offline_data, "CACHE_MIN_BYTES", 0)
    rows = toy_rows(60)
    path = write_jsonl(tmp_path / "p.jsonl", [rows[0], "{not json", *rows[1:]])
    cfg = cfg_for(tmp_path, path, "--data.on_error=skip")
    train, held, report = build_pair_sets(cfg, tok, console=lambda _: None)
    everything = [
        pair(r["prompt"], r["chosen"], r["rejected"], i, language=r["language"]) for i, r in enumerate(rows)
    ]
    expected_train, expected_held = split_by_prompt(everything, 0.1, seed=0)
    for got, want in ((train, expected_train), (held, expected_held)):
        assert list(got.pairs) == [tokenize_preference(tok, p, 24, 12) for p in want]
    assert report["train"]["rows"] == 60 and report["train"]["skipped"] == {"malformed_json": 1}
    assert report["train"]["pairs"] == len(expected_train) and report["eval"]["pairs"] == 6
    truncated = sum(len(tokenize_preference(tok, p, 1000, 500).chosen_ids) > 12 for p in expected_train)
    assert report["train"]["chosen_truncated"] == truncated > 0
    cache = Path(report["train"]["tokens_cache"])
    assert cache.parent == tmp_path / "cache" and isinstance(train.pairs.tokens, np.memmap)

    # Second run: the same store, not rebuilt; another max_length or a touched file: a new one.
    monkeypatch.setattr(offline_data, "write_store", lambda *a, **k: pytest.fail("rebuilt the cached store"))
    again = build_pair_sets(cfg, tok, console=lambda _: None)
    assert again[2] == report and list(again[0].pairs) == list(train.pairs)
    monkeypatch.undo()
    monkeypatch.setattr(offline_data, "CACHE_MIN_BYTES", 0)
    other = build_pair_sets(
        cfg_for(tmp_path, path, "--data.on_error=skip", "--data.max_length=30"), tok, print
    )
    os.utime(path, ns=(1, 1))
    touched = build_pair_sets(cfg, tok, console=lambda _: None)
    assert (
        len({cache, Path(other[2]["train"]["tokens_cache"]), Path(touched[2]["train"]["tokens_cache"])}) == 3
    )


def test_untokenizable_pairs_are_split_like_the_others_then_dropped(tmp_path, tok, monkeypatch):
    def tokenize(tokenizer, pairs, *args, **kwargs):  # record 5 cannot be tokenized
        out = tokenize_preferences(tokenizer, pairs, *args, **kwargs)
        return [ValueError("no tokens") if p.row == 5 else t for p, t in zip(pairs, out)]

    monkeypatch.setattr(offline_data, "tokenize_preferences", tokenize)
    rows = toy_rows(40)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p.jsonl: record 5: cannot tokenize: no tokens"):
        build_pair_sets(cfg_for(tmp_path, path), tok)
    train, held, report = build_pair_sets(
        cfg_for(tmp_path, path, "--data.on_error=skip"), tok, lambda _: None
    )
    everything = [
        pair(r["prompt"], r["chosen"], r["rejected"], i, language=r["language"]) for i, r in enumerate(rows)
    ]
    expected = [[p for p in side if p.row != 5] for side in split_by_prompt(everything, 0.1, seed=0)]
    assert [len(train), len(held)] == [len(side) for side in expected]
    assert list(train.pairs) == [tokenize_preference(tok, p, 24, 12) for p in expected[0]]
    assert report["train"]["untokenizable"] + report["eval"]["untokenizable"] == 1


def test_split_rows_by_hand():
    """Keys a a b c c c d: groups in first-appearance order [a b c d], sizes [2 1 3 1]; Random(0) shuffles
    range(4) to [2, 1, 0, 3]... whatever the order, whole groups move and the held-out side reaches its target."""
    keys = np.array([5, 5, 7, 9, 9, 9, 11], dtype=np.uint64)
    train, held = split_rows(keys, 0.3, seed=0)  # target round(2.1) = 2 pairs
    assert sorted([*train, *held]) == list(range(7)) and len(held) >= 2
    assert not set(keys[train].tolist()) & set(keys[held].tolist())
    assert split_rows(keys, 0.3, seed=0)[1].tolist() == held.tolist()
    with pytest.raises(DataError, match="too few"):
        split_rows(np.array([1, 1], dtype=np.uint64), 0.5, seed=0)


@pytest.mark.parametrize("n, steps, batch", [(10, 2, 3), (10, 4, 3), (1000, 5, 8), (7, 1, 7)])
def test_rows_used_is_every_row_the_steps_draw(n, steps, batch):
    drawn = sorted({r for s in range(steps) for r in batch_indices(n, s, batch, seed=3)})
    assert rows_used(n, steps, batch, seed=3).tolist() == drawn


def test_iter_table_streams_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"a": 1}, {"a": 2}, "{broken"])
    rows = iter_table(path)
    assert next(rows) == ({"a": 1}, "line 1")  # the broken last line is not read yet
    with pytest.raises(DataError, match="line 3: malformed JSON"):
        list(rows)


def test_reference_precompute_covers_the_rows_read_and_resumes_from_its_cache(tmp_path, stories, monkeypatch):
    model, tok = stories
    monkeypatch.setattr(offline_data, "CACHE_MIN_BYTES", 0)
    path = write_jsonl(tmp_path / "p.jsonl", toy_rows(200))
    cfg = cfg_for(tmp_path, path, "--reference.batch_size=8", "--eval.batch_size=4", "--eval.max_pairs=6")
    train, held, _ = build_pair_sets(cfg, tok, console=lambda _: None)
    full = PairSet(list(train.pairs))
    offline_run.precompute_reference(model, full, tok.pad_token_id, 8, "cpu")  # every row, in memory
    calls = []
    original = offline_run.reference_sequence_logprobs
    monkeypatch.setattr(
        offline_run,
        "reference_sequence_logprobs",
        lambda m, b: calls.append(len(b.language)) or original(m, b),
    )
    offline_run.setup_reference(cfg, model, train, held, tok.pad_token_id)
    used = rows_used(len(train), 3, 4, cfg.train.seed)
    assert calls == [8, 4, 4, 2], (
        "12 training rows in batches of 8, then the 6 evaluated rows as evaluate batches"
    )
    computed = ~torch.isnan(train.ref_chosen)
    assert computed.nonzero().flatten().tolist() == used.tolist()
    # Other batch neighbours, other padding: equal up to float32 rounding.
    torch.testing.assert_close(train.ref_chosen[used], full.ref_chosen[used], rtol=1e-5, atol=1e-5)
    assert (~torch.isnan(held.ref_chosen)).sum() == 6

    calls.clear()  # a second run (or a resumed one) reads the cache
    again, held_again, _ = build_pair_sets(cfg, tok, console=lambda _: None)
    offline_run.setup_reference(cfg, model, again, held_again, tok.pad_token_id)
    assert calls == [] and torch.equal(again.ref_chosen[computed], train.ref_chosen[computed])
    every = PairSet(list(train.pairs))  # a run that reads every row batches as the full precompute did
    offline_run.precompute_reference(model, every, tok.pad_token_id, 8, "cpu", rows=torch.arange(len(train)))
    assert torch.equal(every.ref_chosen, full.ref_chosen) and torch.equal(
        every.ref_rejected, full.ref_rejected
    )
    perturbed = type(model)(model.config)
    perturbed.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
    assert offline_run.weights_fingerprint(perturbed) != offline_run.weights_fingerprint(model)
    offline_run.setup_reference(cfg, perturbed.eval(), again, held_again, tok.pad_token_id)
    assert calls, "another reference must not read the first one's cache"
