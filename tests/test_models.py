"""polyalign.models: name resolution, loading modes, dtypes, pad tokens and error messages."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForSequenceClassification

from polyalign import models
from tests.conftest import tiny_llama_config


def test_builtin_names_resolve_to_shipped_folders():
    assert models.resolve_model_path("stories260K") == str(models.BUILTIN["stories260K"])
    assert models.BUILTIN["stories260K"].joinpath("config.json").is_file()
    assert models.BUILTIN["stories260K-sentiment-rm"].name == "sentiment_rm"


def test_load_policy_builtin_trainable_with_pad_token():
    model, tokenizer = models.load_policy("stories260K")
    assert type(model).__name__ == "LlamaForCausalLM" and model.training
    assert all(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == 0 == model.config.pad_token_id  # from the model config, not eos
    assert sum(p.numel() for p in model.parameters()) < 300_000


def test_load_reference_is_frozen_eval_and_dtype_applies():
    model, _ = models.load_reference("stories260K", dtype="bfloat16")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_gradient_checkpointing_flag():
    model, _ = models.load_policy("stories260K", gradient_checkpointing=True)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    assert model.is_gradient_checkpointing if checkpointing is None else checkpointing
    assert model.config.use_cache is False


def test_local_folder_and_reward_model(tmp_path, stories):
    _, tokenizer = stories
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(num_labels=1)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    model, loaded_tokenizer = models.load_reward_model(str(tmp_path))
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert loaded_tokenizer.pad_token_id == 0


def test_tokenizer_without_any_pad_source_falls_back_to_eos(tmp_path):
    raw = AutoTokenizer.from_pretrained(models.BUILTIN["stories260K"])
    assert raw.pad_token is None
    raw.save_pretrained(tmp_path)  # a tokenizer-only folder: no model config to read pad_token_id from
    tokenizer = models.load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/missing", "a/b/c"])
def test_missing_local_path_error_names_it_and_lists_builtins(name):
    with pytest.raises(FileNotFoundError) as err:
        models.load_policy(name)
    assert repr(name) in str(err.value) and "stories260K" in str(err.value)


def test_hub_ids_pass_through():
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model_path("gpt2") == "gpt2"


def test_bad_dtype_and_empty_name():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.load_policy("stories260K", dtype="fp8")
    with pytest.raises(ValueError, match="non-empty"):
        models.resolve_model_path("")


@pytest.mark.skipif(
    not models.BUILTIN["stories260K-sentiment-rm"].is_dir(), reason="reward model not shipped"
)
def test_builtin_sentiment_reward_model_loads():
    model, tokenizer = models.load_reward_model("stories260K-sentiment-rm")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert not model.training and tokenizer.pad_token_id == 0


def _cohere_lm(folder, tokenizer):
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=512, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, initializer_range=0.2)  # fmt: skip
    CohereForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_score_model_for_a_family_without_classifier_round_trips(tmp_path, stories):
    """Cohere has no ForSequenceClassification: backbone + our head, seeded, saved and reloaded by path."""
    base = _cohere_lm(tmp_path / "lm", stories[1])
    model, tokenizer = models.load_score_model(base, seed=0)
    assert isinstance(model, models.ScoreModel) and model.training
    assert torch.equal(model.score.weight, models.load_score_model(base, seed=0)[0].score.weight)
    assert not torch.equal(model.score.weight, models.load_score_model(base, seed=1)[0].score.weight)
    ids = torch.tensor([[1, 40, 50, 60, 0, 0], [1, 70, 80, 90, 100, 2]])
    right = (ids != 0).long()
    left_ids, left_mask = torch.tensor([[0, 0, 1, 40, 50, 60], ids[1].tolist()]), right.flip(1)
    left_mask[1] = 1
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=right).logits[:, 0]
        hidden = model.base_model(input_ids=ids[:1, :4]).last_hidden_state[0, -1]
        torch.testing.assert_close(scores[0], model.score(hidden)[0])  # the last real token, by the mask
        torch.testing.assert_close(model(input_ids=left_ids, attention_mask=left_mask).logits[:, 0], scores)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    loaded, _ = models.load_reward_model(str(tmp_path / "rm"))
    assert isinstance(loaded, models.ScoreModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=right).logits[:, 0], scores)
    (tmp_path / "rm" / models.SCORE_CONFIG).write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="score_head.json: format 'something-else'"):
        models.load_reward_model(str(tmp_path / "rm"))


def test_score_model_keeps_a_trained_classifier_head(tmp_path, stories):
    """A transformers classifier checkpoint keeps its trained head; a causal LM gets a fresh seeded one."""
    torch.manual_seed(0)
    trained = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    trained.save_pretrained(tmp_path)
    stories[1].save_pretrained(tmp_path)
    model, _ = models.load_score_model(str(tmp_path), seed=5)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert torch.equal(model.score.weight, trained.score.weight)
