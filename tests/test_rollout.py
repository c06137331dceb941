"""HFEngine: sampling correctness, log-probs, seeds, EOS / stop strings, grouping, errors; build_engine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from polyalign.logprobs import completion_logprobs
from polyalign.models import load_policy
from polyalign.rollout import ENGINES, Engine, build_engine
from polyalign.rollout.hf import HFEngine, filter_top_k_top_p, sample_tokens
from polyalign.types import Sampling
from tests.conftest import model_atol

PROMPTS = ["Once upon a time", "The little dog ran to the"]


@pytest.fixture
def engine(stories) -> HFEngine:
    return HFEngine(*stories)


def greedy(max_new_tokens: int = 30, **kwargs) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def assert_valid_layout(r, pad_id: int) -> None:
    """Masks are a prefix of ones, padding holds pad ids and zero log-probs."""
    lengths = r.completion_mask.sum(1)
    expected_mask = torch.arange(r.completion_ids.shape[1])[None, :] < lengths[:, None]
    assert torch.equal(r.completion_mask.bool(), expected_mask)
    assert torch.all(r.completion_ids[~expected_mask] == pad_id)
    assert torch.all(r.logprobs[~expected_mask] == 0)
    assert torch.all(r.logprobs[expected_mask] <= 0)
    assert r.completion_ids.dtype == torch.long and r.logprobs.dtype == torch.float32
    assert r.finished.dtype == torch.bool and not r.logprobs.is_inference()


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 20), (0.0, 0)])
def test_sampled_logprobs_equal_recomputed(stories, engine, temperature, top_k):
    model, _ = stories
    sampling = Sampling(max_new_tokens=24, temperature=temperature, top_k=top_k, seed=11)
    r = engine.generate(PROMPTS, n=3, sampling=sampling)
    with torch.no_grad():
        recomputed = completion_logprobs(
            model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature or 1.0
        )
    torch.testing.assert_close(r.logprobs, recomputed, atol=1e-4, rtol=0)
    assert_valid_layout(r, engine.pad_id)


def test_add_special_tokens_controls_bos(stories):
    with_bos = HFEngine(*stories).generate(["Once upon a time"], n=1, sampling=greedy(3))
    without = HFEngine(*stories, add_special_tokens=False).generate(
        ["Once upon a time"], n=1, sampling=greedy(3)
    )
    assert with_bos.prompt_ids[0].tolist() == [1] + without.prompt_ids[0].tolist()


def test_seed_reproducible_and_distinct(engine):
    run = lambda seed: engine.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=20, seed=seed))
    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert first.completions == again.completions
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_greedy_matches_hf_generate(stories, engine):
    model, tokenizer = stories
    r = engine.generate(["Once upon a time"], n=1, sampling=greedy(40))
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=40, pad_token_id=0)
    expected = out[0, inputs.input_ids.shape[1] :]
    assert r.completion_ids[0, : len(expected)].tolist() == expected.tolist()
    assert r.completions[0] == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.completions[0].startswith(", there was a little girl")


def test_groups_are_prompt_major_and_padding_free(engine):
    r = engine.generate(PROMPTS, n=3, sampling=greedy(), extras={"language": ["en", "fr"]})
    assert r.group_size == 3 and r.num_prompts == 2 and len(r.completions) == 6
    assert r.extras == {"language": ["en"] * 3 + ["fr"] * 3}
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], n=1, sampling=greedy())
        prompt_tokens = engine.tokenizer(prompt)["input_ids"]
        for row in range(i * 3, i * 3 + 3):
            assert r.completions[row] == alone.completions[0]
            length = int(r.completion_mask[row].sum())
            assert torch.equal(r.completion_ids[row, :length], alone.completion_ids[0, :length])
            assert r.prompt_ids[row][r.prompt_mask[row].bool()].tolist() == prompt_tokens
    # Prompts are left padded: the shorter prompt's padding comes first.
    assert r.prompt_mask[0, 0] == 0 and r.prompt_mask[0, -1] == 1 and r.prompt_mask[3].all()


def test_eos_truncates_and_masks(stories, tiny_llama):
    _, tokenizer = stories
    sampling = Sampling(max_new_tokens=20, seed=5)
    tiny_llama.generation_config.eos_token_id = None
    tiny_llama.config.eos_token_id = 999_999  # never sampled: the unconstrained run
    free = HFEngine(tiny_llama, tokenizer).generate(PROMPTS, n=3, sampling=sampling)
    assert not free.finished.any() and free.completion_mask.all()
    eos = int(free.completion_ids.flatten().mode().values)  # the most frequent token: several rows hit it
    tiny_llama.config.eos_token_id = eos
    r = HFEngine(tiny_llama, tokenizer).generate(PROMPTS, n=3, sampling=sampling)
    assert_valid_layout(r, 0)
    for row in range(6):
        hits = (free.completion_ids[row] == eos).nonzero().flatten().tolist()
        length = hits[0] + 1 if hits else 20
        assert int(r.completion_mask[row].sum()) == length
        assert bool(r.finished[row]) == bool(hits)
        assert torch.equal(r.completion_ids[row, :length], free.completion_ids[row, :length])
        torch.testing.assert_close(r.logprobs[row, :length], free.logprobs[row, :length])
    # Rows end at different steps while others go on (finished rows leave the KV cache mid-loop).
    ended_lengths = r.completion_mask.sum(1)[r.finished].unique()
    assert len(ended_lengths) >= 2 and not r.finished.all()


def test_stop_strings_cut_text_and_end_mask(engine):
    tokenizer = engine.tokenizer
    r = engine.generate(["Once upon a time"], n=1, sampling=greedy(40, stop_strings=("park", "Lily")))
    assert r.finished[0]
    assert r.completions[0] == ", there was a little girl named "
    ids = r.completion_ids[0, : int(r.completion_mask[0].sum())].tolist()
    assert "Lily" in tokenizer.decode(ids) and "Lily" not in tokenizer.decode(ids[:-1])
    never = engine.generate(["Once upon a time"], n=1, sampling=greedy(10, stop_strings=("zebra!",)))
    assert not never.finished[0] and never.completion_mask.sum() == 10


def test_stop_strings_per_row_when_sampling(engine):
    r = engine.generate(PROMPTS, n=4, sampling=Sampling(max_new_tokens=60, seed=2, stop_strings=(".",)))
    assert r.finished.sum() >= 4
    for row in range(8):
        ids = r.completion_ids[row, : int(r.completion_mask[row].sum())].tolist()
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert "." not in r.completions[row]
        assert ("." in text) == bool(r.finished[row])
        if r.finished[row]:
            assert "." not in engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    reference = engine.generate(PROMPTS, n=2, sampling=greedy())
    for sampling in (
        Sampling(max_new_tokens=30, top_k=1, seed=0),
        Sampling(max_new_tokens=30, top_p=1e-6, seed=1),
    ):
        r = engine.generate(PROMPTS, n=2, sampling=sampling)
        assert torch.equal(r.completion_ids, reference.completion_ids)
        torch.testing.assert_close(r.logprobs, reference.logprobs)


def test_prefill_once_equals_repeated_prefill(stories):
    sampling = Sampling(max_new_tokens=16, seed=9)
    once = HFEngine(*stories, prefill_once=True).generate(PROMPTS, n=3, sampling=sampling)
    repeated = HFEngine(*stories, prefill_once=False).generate(PROMPTS, n=3, sampling=sampling)
    assert torch.equal(once.completion_ids, repeated.completion_ids)
    torch.testing.assert_close(
        once.logprobs, repeated.logprobs, atol=model_atol(repeated.logprobs, stories[0].config), rtol=0
    )


def test_sample_tokens_frequencies_follow_softmax():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)

    def freqs(**kwargs) -> torch.Tensor:
        sampling = Sampling(**kwargs)
        tokens, logprobs = sample_tokens(logits, sampling, generator)
        expected = (logits / sampling.temperature).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        torch.testing.assert_close(logprobs, expected)
        return torch.bincount(tokens, minlength=4).float() / len(tokens)

    torch.testing.assert_close(freqs(), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    torch.testing.assert_close(freqs(top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    torch.testing.assert_close(freqs(top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    # Temperature 2 flattens: probabilities proportional to sqrt(p).
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(freqs(temperature=2.0), flat / flat.sum(), atol=0.015, rtol=0)


def test_filter_top_k_top_p_hand_example():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    assert torch.isinf(filter_top_k_top_p(logits, top_k=1, top_p=1.0)).tolist() == [[True, False, True]]
    assert torch.isinf(filter_top_k_top_p(logits, top_k=0, top_p=0.8)).tolist() == [[True, False, False]]
    assert torch.equal(filter_top_k_top_p(logits, top_k=0, top_p=1.0), logits)


def test_gradient_checkpointed_policy_generates_the_same(engine):
    policy, tokenizer = load_policy("stories260K", gradient_checkpointing=True)
    r = HFEngine(policy, tokenizer).generate(PROMPTS, n=2, sampling=greedy(12))
    assert torch.equal(r.completion_ids, engine.generate(PROMPTS, n=2, sampling=greedy(12)).completion_ids)
    assert policy.training


def test_train_mode_restored(tiny_llama, stories):
    tiny_llama.train()
    HFEngine(tiny_llama, stories[1]).generate(["Hi"], n=1, sampling=greedy(3))
    assert tiny_llama.training
    tiny_llama.eval()
    HFEngine(tiny_llama, stories[1]).generate(["Hi"], n=1, sampling=greedy(3))
    assert not tiny_llama.training


def test_too_long_prompt_is_rejected(tiny_llama, stories):
    engine = HFEngine(tiny_llama, stories[1])  # context of 128 positions
    long_prompt = " ".join(["the"] * 100)
    with pytest.raises(ValueError, match=r"prompt 1 has 101 tokens.*at most 64"):
        engine.generate(["Hi", long_prompt], n=1, sampling=greedy(64))
    r = engine.generate(["Hi", long_prompt], n=1, sampling=greedy(20))
    assert r.completion_ids.shape[1] == 20


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[], n=1), "non-empty list"),
        (dict(prompts=["a"], n=0), "n \\(completions per prompt\\)"),
        (dict(prompts=["a"], n=1, sampling=Sampling(temperature=-1)), "temperature"),
        (dict(prompts=["a"], n=1, sampling=Sampling(top_p=0)), "top_p"),
        (dict(prompts=["a"], n=1, sampling=Sampling(top_k=-2)), "top_k"),
        (dict(prompts=["a"], n=1, sampling=Sampling(max_new_tokens=0)), "max_new_tokens"),
        (dict(prompts=["a"], n=1, sampling=Sampling(stop_strings=("",))), "stop_strings"),
        (dict(prompts=["a", "b"], n=1, extras={"x": [1]}), "extras\\['x'\\] has 1 values for 2 prompts"),
    ],
)
def test_bad_arguments_raise(engine, kwargs, message):
    kwargs.setdefault("sampling", Sampling(max_new_tokens=4))
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_build_engine_and_protocol(stories, tiny_llama):
    engine = build_engine("hf", *stories)
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    engine.load_weights(tiny_llama)
    assert engine.model is tiny_llama
    assert set(ENGINES) >= {"hf", "vllm"}
    with pytest.raises(ValueError, match="unknown rollout engine 'nope'.*'hf'"):
        build_engine("nope", *stories)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_names_the_extra(stories):
    import polyalign.recipes.vllm  # noqa: F401  (the plugin registers rollout.engine: vllm)

    with pytest.raises(ImportError, match=r"polyalign\[vllm\]"):
        build_engine("vllm", *stories)
