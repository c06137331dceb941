"""The vLLM rollout engine: its pure pieces on CPU, the engine itself on a GPU (marked `gpu`).

The GPU tests need CUDA and `vllm` (pip install 'polyalign[vllm]') and are skipped otherwise; they run the
engine on the shipped stories260K model in float32 and hold it to HFEngine's contract and to the trainer's
log-probs. scripts/gpu_check.py runs them on a lent GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import polyalign.recipes.vllm  # noqa: F401  (registers the engine)
from polyalign.logprobs import completion_logprobs
from polyalign.recipes.vllm.engine import policy_weights
from polyalign.recipes.vllm.requests import (
    collect_outputs,
    request_options,
    row_seeds,
    stop_length,
    vllm_logprobs_exact,
)
from polyalign.rollout import build_engine
from polyalign.rollout.mismatch import logprob_mismatch
from polyalign.types import Sampling

# ---------------------------------------------------------------- CPU: the mismatch metric


def test_logprob_mismatch_hand_computed():
    """Two rows, mask [[1, 1, 0], [1, 0, 0]].

    d = trainer - sampler on real tokens: row 0: (-1.0 - -1.5, -2.0 - -0.5) = (0.5, -1.5); row 1: (2.0).
    token |d|: mean (0.5 + 1.5 + 2.0) / 3 = 4/3, max 2.0. Sequence log ratios: -1.0 and 2.0, mean 0.5; |D| > 1
    only for row 1 (|-1.0| is not > 1): fraction 0.5. The padding (999 vs -999) must not count.
    """
    sampler = torch.tensor([[-1.5, -0.5, 999.0], [-3.0, 0.0, 0.0]])
    trainer = torch.tensor([[-1.0, -2.0, -999.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = logprob_mismatch(sampler, trainer, mask)
    assert out["mismatch/token_abs_mean"] == pytest.approx(4 / 3)
    assert out["mismatch/token_abs_max"] == pytest.approx(2.0)
    assert out["mismatch/seq_log_ratio_mean"] == pytest.approx(0.5)
    assert out["mismatch/seq_frac_abs_gt_1"] == pytest.approx(0.5)


def test_logprob_mismatch_zero_when_equal_and_bad_shapes_raise():
    x = torch.randn(3, 4)
    out = logprob_mismatch(x, x.clone(), torch.ones(3, 4))
    assert all(v == 0.0 for v in out.values())
    with pytest.raises(ValueError, match="one shape"):
        logprob_mismatch(x, x[:, :3], torch.ones(3, 4))
    with pytest.raises(ValueError, match="no real tokens"):
        logprob_mismatch(x, x, torch.zeros(3, 4))


# ---------------------------------------------------------------- CPU: errors without vllm or CUDA


def test_missing_vllm_names_the_extra(stories, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    with pytest.raises(ImportError, match=r"pip install 'polyalign\[vllm\]'"):
        build_engine("vllm", *stories)


def test_no_cuda_is_a_clear_error(stories, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        build_engine("vllm", *stories, gpu_memory_utilization=0.3)


def test_build_engine_passes_options(stories):
    engine = build_engine("hf", *stories, prefill_once=False)
    assert engine.prefill_once is False
    with pytest.raises(TypeError):
        build_engine("hf", *stories, gpu_memory_utilization=0.3)


# ---------------------------------------------------------------- CPU: request building and output parsing


def test_row_seeds_depend_on_seed_and_global_row_only():
    whole = row_seeds(7, 0, 8)
    assert whole[4:] == row_seeds(7, 4, 4)  # the second half of a split batch
    assert len(set(whole)) == 8 and all(0 <= s < 2**31 for s in whole)
    assert row_seeds(8, 0, 8) != whole
    assert row_seeds(None, 3, 2) == [None, None]


def test_request_options_map_sampling():
    eos = [2, 1]
    opts = request_options(Sampling(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5), eos)
    assert (opts["max_tokens"], opts["temperature"], opts["top_p"], opts["top_k"]) == (9, 0.7, 0.9, 5)
    assert opts["stop_token_ids"] == eos and opts["logprobs"] == 0 and opts["n"] == 1
    greedy = request_options(Sampling(temperature=0.0, top_p=0.5, top_k=3, stop_strings=(".",)), eos)
    assert (greedy["top_p"], greedy["top_k"], greedy["stop"]) == (1.0, -1, ["."])
    assert request_options(Sampling(top_k=0), eos)["top_k"] == -1


@pytest.mark.parametrize(
    "sampling, mode, exact",
    [
        (Sampling(temperature=0.7), "processed_logprobs", True),
        (Sampling(temperature=0.7, top_p=0.9), "processed_logprobs", False),
        (Sampling(temperature=1.0, top_k=5), "processed_logprobs", False),
        (Sampling(temperature=0.0, top_k=5), "processed_logprobs", True),
        (Sampling(temperature=1.0, top_p=0.9), "raw_logprobs", True),
        (Sampling(temperature=0.7), "raw_logprobs", False),
    ],
)
def test_vllm_logprobs_exact(sampling, mode, exact):
    assert vllm_logprobs_exact(sampling, mode) is exact


def test_stop_length_is_the_first_token_completing_the_stop(stories):
    tokenizer = stories[1]
    ids = tokenizer("Tom had a ball. He liked it. The end", add_special_tokens=False)["input_ids"]
    length = stop_length(tokenizer, ids, (".",))
    assert "." in tokenizer.decode(ids[:length]) and "." not in tokenizer.decode(ids[: length - 1])
    assert length < len(ids)
    assert stop_length(tokenizer, ids, ("zzz",)) == len(ids)


def _out(ids, finish, stop_reason=None, logprobs="auto"):
    if logprobs == "auto":  # one {token: Logprob} mapping per position, log-prob -0.1 * (position + 1)
        logprobs = [{t: SimpleNamespace(logprob=-0.1 * (i + 1))} for i, t in enumerate(ids)]
    seq = SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=stop_reason, logprobs=logprobs)
    return SimpleNamespace(outputs=[seq])


def test_collect_outputs_pads_masks_and_cuts_at_stop_strings(stories):
    tokenizer = stories[1]
    text_ids = tokenizer("a dog. and more", add_special_tokens=False)["input_ids"]
    cut = stop_length(tokenizer, text_ids, (".",))
    outputs = [
        _out([5, 6, 2], "stop"),  # EOS: kept in the mask
        _out(
            text_ids, "stop", stop_reason="."
        ),  # vLLM ran past the stop string: cut at the token completing it
        _out([7, 8, 9, 10], "length"),
    ]
    ids, mask, logprobs, finished, stopped, complete = collect_outputs(outputs, 0, tokenizer, (".",))
    width = max(3, cut, 4)
    assert ids.shape == mask.shape == logprobs.shape == (3, width)
    assert mask.sum(1).tolist() == [3, cut, 4]
    assert ids[0, :3].tolist() == [5, 6, 2] and ids[0, 3:].eq(0).all()
    assert ids[1, :cut].tolist() == text_ids[:cut]
    assert logprobs[2].tolist()[:4] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert logprobs[mask == 0].eq(0).all()
    assert finished.tolist() == [True, True, False] and stopped.tolist() == [False, True, False]
    assert complete
    *_, complete = collect_outputs([_out([5, 6], "length", logprobs=None)], 0, tokenizer, ())
    assert not complete


def test_policy_weights_plain_and_peft(tiny_llama, monkeypatch):
    names = dict(policy_weights(tiny_llama))
    state = tiny_llama.state_dict()
    assert names.keys() == state.keys()
    assert all(torch.equal(names[k], state[k]) for k in state)

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    calls = []
    fake = types.ModuleType("polyalign.lora")
    fake.merged_state_dict = lambda model: calls.append(model) or {"model.norm.weight": torch.ones(2)}
    monkeypatch.setitem(sys.modules, "polyalign.lora", fake)
    assert [n for n, _ in policy_weights(lora)] == ["model.norm.weight"] and calls == [lora]


# ---------------------------------------------------------------- GPU: the engine itself

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs CUDA and vllm (pip install 'polyalign[vllm]')",
)
PROMPTS = ["Once upon a time, there was a little dog", "Lily went to the park", "The sun was"]


@pytest.fixture(scope="module")
def gpu_engine():
    """(engine, policy, tokenizer): stories260K in float32 on CUDA and a vLLM engine over it."""
    from polyalign.models import load_policy

    policy, tokenizer = load_policy("stories260K", device="cuda")
    backend = os.environ.get("POLYALIGN_VLLM_TEST_BACKEND", "FLEX_ATTENTION")  # head size 8, float32
    engine = build_engine(
        "vllm",
        policy.eval(),
        tokenizer,
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        max_model_len=512,
        attention_backend=backend,
    )
    yield engine, policy, tokenizer
    engine.close()


def _trainer_logprobs(model, rollout, temperature):
    with torch.no_grad():
        return completion_logprobs(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=temperature or 1.0,
        )


@pytest.mark.gpu
@needs_gpu
def test_gpu_contract(gpu_engine):
    engine, policy, tokenizer = gpu_engine
    from polyalign.rollout.hf import HFEngine

    sampling = Sampling(max_new_tokens=160, temperature=1.0, seed=3, stop_strings=("!",))
    r = engine.generate(PROMPTS, n=4, sampling=sampling, extras={"lang": ["en", "fr", "de"]})
    B, T = 12, r.completion_ids.shape[1]
    hf_ids, hf_mask = HFEngine(policy, tokenizer)._encode(PROMPTS, 160)
    assert torch.equal(r.prompt_ids.cpu(), hf_ids.repeat_interleave(4, 0))  # group-major, our encoding
    assert torch.equal(r.prompt_mask.cpu(), hf_mask.repeat_interleave(4, 0))
    assert r.completion_mask.shape == r.logprobs.shape == (B, T) and r.finished.shape == (B,)
    assert r.extras == {"lang": ["en"] * 4 + ["fr"] * 4 + ["de"] * 4} and len(r.completions) == B
    lengths = r.completion_mask.sum(1)
    positions = torch.arange(T, device=lengths.device)
    assert torch.equal(r.completion_mask.bool(), positions[None] < lengths[:, None])  # right padded
    assert r.completion_ids[r.completion_mask == 0].eq(engine.pad_id).all()
    assert r.logprobs[r.completion_mask == 0].eq(0).all() and (r.logprobs <= 0).all()
    for row in range(B):
        ids = r.completion_ids[row, : lengths[row]].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if "!" in text:  # ended by the stop string at the token that completed it; text cut before it
            assert r.finished[row] and "!" not in r.completions[row]
            assert "!" not in tokenizer.decode(ids[:-1], skip_special_tokens=True)
        elif r.finished[row]:
            assert ids[-1] in engine.eos_ids and not any(t in engine.eos_ids for t in ids[:-1])
        else:
            assert len(ids) == 160
    assert r.finished.any(), "stories260K ends about a third of its stories within 160 tokens"


@pytest.mark.gpu
@needs_gpu
def test_gpu_seeded_and_split_independent(gpu_engine):
    engine = gpu_engine[0]
    sampling = Sampling(max_new_tokens=32, temperature=1.0, seed=11)
    whole = engine.generate(PROMPTS, n=4, sampling=sampling)
    again = engine.generate(PROMPTS, n=4, sampling=sampling)
    assert torch.equal(whole.completion_ids, again.completion_ids)
    second = engine.generate(
        PROMPTS[1:], n=4, sampling=Sampling(32, 1.0, seed=11, row_offset=4, total_rows=12)
    )
    T = second.completion_ids.shape[1]
    assert torch.equal(whole.completion_ids[4:, :T], second.completion_ids)
    assert whole.completion_mask[4:, T:].eq(0).all()
    other = engine.generate(PROMPTS, n=4, sampling=Sampling(32, 1.0, seed=12))
    assert other.completions != whole.completions
    assert len(set(whole.completions[:4])) > 1, "the rows of a group are sampled independently"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.0, 1.0), (0.8, 0.9)])
def test_gpu_logprobs_match_trainer(gpu_engine, temperature, top_p):
    engine, policy = gpu_engine[:2]
    sampling = Sampling(max_new_tokens=48, temperature=temperature, top_p=top_p, seed=5)
    r = engine.generate(PROMPTS, n=4, sampling=sampling)
    expected_source = "policy" if top_p < 1 else "vllm"
    assert engine.last_logprobs_source == expected_source
    stats = logprob_mismatch(r.logprobs, _trainer_logprobs(policy, r, temperature), r.completion_mask)
    assert stats["mismatch/token_abs_mean"] < 1e-3, stats
    assert stats["mismatch/token_abs_max"] < 2e-2, stats
    if temperature == 0:  # greedy equals our own greedy decoding on nearly every row
        from polyalign.rollout.hf import HFEngine

        hf = HFEngine(policy, gpu_engine[2]).generate(PROMPTS, n=1, sampling=sampling)
        same = [a == b for a, b in zip(r.completions[::4], hf.completions)]
        assert sum(same) >= 2, (r.completions[::4], hf.completions)


@pytest.mark.gpu
@needs_gpu
def test_gpu_weights_pushed_after_a_step(gpu_engine):
    engine, policy, tokenizer = gpu_engine
    updated = copy.deepcopy(policy).train()
    optimizer = torch.optim.SGD(updated.parameters(), lr=0.5)
    batch = tokenizer(["Tom was sad. He cried and cried."] * 2, return_tensors="pt").to("cuda")
    updated(**batch, labels=batch["input_ids"]).loss.backward()  # one large step away from the policy
    optimizer.step()
    updated.eval()
    sampling = Sampling(max_new_tokens=32, temperature=1.0, seed=9)
    try:
        stale = engine.generate(PROMPTS, n=2, sampling=sampling)
        before = logprob_mismatch(
            stale.logprobs, _trainer_logprobs(updated, stale, 1.0), stale.completion_mask
        )
        engine.load_weights(updated)
        fresh = engine.generate(PROMPTS, n=2, sampling=sampling)
        after = logprob_mismatch(
            fresh.logprobs, _trainer_logprobs(updated, fresh, 1.0), fresh.completion_mask
        )
    finally:
        engine.load_weights(policy)  # the module's engine goes back to the shared policy
    assert before["mismatch/token_abs_mean"] > 0.05, before
    assert after["mismatch/token_abs_mean"] < 1e-3, after
    assert not math.isnan(after["mismatch/seq_log_ratio_mean"])
    restored = engine.generate(PROMPTS, n=2, sampling=sampling)
    assert torch.equal(restored.completion_ids, stale.completion_ids)


def test_model_folder_holds_what_vllm_reads(tiny_llama, stories, tmp_path):
    """vLLM starts from config.json (architecture named even for a model built from a config),
    generation_config.json and the tokenizer; the weights come later, pushed."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from polyalign.recipes.vllm.engine import _write_model_folder

    assert not tiny_llama.config.architectures
    _write_model_folder(tiny_llama, stories[1], str(tmp_path))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["LlamaForCausalLM"] and config.hidden_size == 32
    assert not tiny_llama.config.architectures, "the policy's own config is left alone"
    assert (
        GenerationConfig.from_pretrained(tmp_path).eos_token_id == tiny_llama.generation_config.eos_token_id
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("The sun")["input_ids"] == stories[1]("The sun")["input_ids"]
    assert not list(tmp_path.glob("*.safetensors"))


def test_policy_weights_of_a_lora_policy_use_transformers_names(tiny_llama):
    peft = pytest.importorskip("peft")
    pytest.importorskip("polyalign.lora")
    lora = peft.get_peft_model(copy.deepcopy(tiny_llama), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(param, 0.1)  # a trained adapter: the merged q_proj differs from the base
    pushed = dict(policy_weights(lora))
    assert pushed.keys() == tiny_llama.state_dict().keys()  # what vLLM's load_weights expects
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pushed[q], tiny_llama.state_dict()[q])
    assert torch.equal(pushed["model.norm.weight"], tiny_llama.state_dict()["model.norm.weight"])
