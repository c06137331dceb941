"""Checks that the benchmark workloads match BENCHMARKS.md and that the timing helpers do their arithmetic.

No timing assertions: times are injected by hand. Run: python -m pytest benchmarks/test_workloads.py -q
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads as wl  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return wl.build_tokenizer()


def test_tokenizer_vocab_and_special_ids(tokenizer):
    assert len(tokenizer) == 8192
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("The movie was great.")["input_ids"]
    assert 0 not in ids and 1 not in ids and 2 not in ids  # nothing special is added
    assert tokenizer.decode(ids) == "The movie was great."


@pytest.mark.parametrize(("size", "layers"), [("tiny", 4), ("small", 8)])
def test_model_sizes(size, layers):
    model = wl.build_model(size, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == wl.EXPECTED_PARAMS[size]
    assert model.config.num_hidden_layers == layers and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_model_is_seeded():
    first, second = (
        wl.build_model("tiny", seed=3, verbose=False),
        wl.build_model("tiny", seed=3, verbose=False),
    )
    other = wl.build_model("tiny", seed=4, verbose=False)
    w = "model.layers.0.mlp.up_proj.weight"
    assert first.state_dict()[w].equal(second.state_dict()[w])
    assert not first.state_dict()[w].equal(other.state_dict()[w])


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        wl.build_config("huge")


def test_rloo_prompts_lengths_and_determinism(tokenizer):
    prompts = wl.rloo_prompts(80, seed=0, tokenizer=tokenizer)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(prompts) == 80 and min(lengths) >= 9 and max(lengths) <= 24
    assert prompts == wl.rloo_prompts(80, seed=0, tokenizer=tokenizer)
    assert prompts != wl.rloo_prompts(80, seed=1, tokenizer=tokenizer)
    assert wl.rloo_prompts(4, seed=0, tokenizer=tokenizer) == prompts[:4]


def test_dpo_pairs_lengths(tokenizer):
    pairs = wl.dpo_pairs(wl.PAIRS_PER_STEP * wl.STEPS)
    assert len(pairs) == 160
    for side in ("chosen", "rejected"):
        lengths = [len(tokenizer(p["prompt"] + p[side])["input_ids"]) + 1 for p in pairs]
        assert min(lengths) >= 55 and max(lengths) <= 91
        assert 70 <= statistics.mean(lengths) <= 76
    assert all(p["chosen"].startswith(" ") and p["prompt"].endswith("Answer:") for p in pairs)
    with pytest.raises(ValueError, match="n must be in"):
        wl.dpo_pairs(10_000)


def test_reward_fn():
    rewards = wl.reward_fn(["p", "p", "p"], ["abc def", "!!!!", ""])
    assert rewards == [1.0, 0.0, 0.0]
    assert wl.reward_fn(["p"], ["ab!!"], extra_column=[1]) == [0.5]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        wl.reward_fn(["a", "b"], ["c"])


def test_phase_timer_summary_arithmetic():
    timer = common.PhaseTimer()
    for step in range(5):
        timer.begin_step()
        timer.add("generate", 1.0 + step)
        timer.add("backward", 0.5)
        timer.count("generated_tokens", 1024)
        timer.end_step()
    timer.step_times = [10.0, 10.0, 4.0, 6.0, 5.0]  # injected, so the arithmetic is checkable
    summary = timer.summary(warmup=2)
    assert summary["median_s_per_step"] == 5.0
    assert summary["breakdown_s"]["generate"] == 4.0  # median of 3, 4, 5
    assert summary["breakdown_s"]["backward"] == 0.5
    assert summary["breakdown_s"]["other"] == 0.5  # median of 4-3.5, 6-4.5, 5-5.5
    assert summary["breakdown_share"]["generate"] == 0.8
    assert timer.median_count("generated_tokens", warmup=2) == 1024


def test_median_after_warmup_needs_kept_steps():
    assert common.median_after_warmup([9, 9, 9, 1, 2, 3], warmup=3) == 2
    with pytest.raises(ValueError, match="need more than 3"):
        common.median_after_warmup([1, 2, 3], warmup=3)


def test_parse_result_takes_last_result_line():
    out = "\n".join(["noise", json.dumps({"lib": "a"}), "{not json", json.dumps({"lib": "b"}), "{'loss': 1}"])
    assert common.parse_result(out) == {"lib": "b"}
    with pytest.raises(ValueError, match="no benchmark result line"):
        common.parse_result("nothing here")
