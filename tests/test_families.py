"""The model families of the papers and their neighbours, each as a tiny random model built here from its
transformers config class (no hub): Llama, Qwen 2, Qwen 3, Mistral, Gemma 2, Gemma 3 (text), Phi-3, OLMo 2,
GPT-NeoX (Pythia), Cohere (Aya 23) and GPT-2, saved with the stories260K tokenizer plus the family's chat
template (written below in the family's documented format) and its special tokens.

Per family (docs/models.md is the table of what this covers):
- every trainer through the real CLI (`polyalign train`), one step each: RLOO and PPO scored by a reward
  model trained on another family (Cohere, a `ScoreModel`), DPO and SFT on chat-formatted pairs, a reward
  model; DPO and a reward model again with LoRA (default targets, merged exports); the PPO run resumes from
  its checkpoint (critic included), the reward model's checkpoint reloads into a fresh scorer and scores
  like its export;
- training log-probs equal log_softmax of the ForCausalLM forward's logits (gemma's soft-capping, cohere's
  logit_scale included), sampled log-probs equal a fresh forward, greedy rollouts equal `generate`;
- LoRA's default targets (`lora.FAMILY_TARGETS`) are the layers peft's all-linear finds, head excluded;
- the chat template renders the documented layout; a template without a system role gets the system text in
  the first user turn.
FSDP on 2 gloo processes (PPO: policy, critic, reward model) runs for GPT-NeoX, Cohere and Gemma 2 (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from safetensors.torch import load_model
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from polyalign.cli import main
from polyalign.config import LoraConfig
from polyalign.data.chat import render_prompt, tokenize_prompt
from polyalign.logprobs import completion_logprobs, sequence_scores
from polyalign.lora import FAMILY_TARGETS, apply_lora
from polyalign.models import ScoreModel, load_policy, load_reward_model, load_score_model, load_tokenizer
from polyalign.rewards.model import encode_texts
from polyalign.rollout.fast_decode import unsupported_reason
from polyalign.rollout.hf import HFEngine
from polyalign.types import Sampling

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, initializer_range=0.2)  # fmt: skip
# Templates in each family's documented layout (the Hugging Face tokenizer_config.json of its chat models).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # fmt: skip
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
           "{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")  # fmt: skip
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
          "supported') }}{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
          "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")  # fmt: skip
GEMMA3 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + "
          "'\n\n' %}{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}"
          "{% endif %}{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
          "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + "
          "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
          "{% endif %}")  # fmt: skip
PHI3 = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")  # fmt: skip
OLMO2 = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")  # fmt: skip
COHERE = ("{{ bos_token }}{% for m in messages %}{% set token = {'system': '<|SYSTEM_TOKEN|>', 'user': "
          "'<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[m['role']] %}{{ '<|START_OF_TURN_TOKEN|>' + "
          "token + m['content'] + '<|END_OF_TURN_TOKEN|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")  # fmt: skip
SPECIALS = {
    LLAMA3: ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    CHATML: ["<|im_start|>", "<|im_end|>"],
    GEMMA2: ["<start_of_turn>", "<end_of_turn>"],
    GEMMA3: ["<start_of_turn>", "<end_of_turn>"],
    PHI3: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    OLMO2: ["<|system|>", "<|user|>", "<|assistant|>"],
    COHERE: [
        "<|START_OF_TURN_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        "<|SYSTEM_TOKEN|>",
        "<|USER_TOKEN|>",
        "<|CHATBOT_TOKEN|>",
    ],  # fmt: skip
}
GEMMA = dict(SIZES, head_dim=8, final_logit_softcapping=2.0, sliding_window=64)
NEOX = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)  # fmt: skip
GPT2 = dict(n_layer=2, n_embd=32, n_head=4, n_positions=128, initializer_range=0.2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)  # fmt: skip
# name -> (model class, config, chat template or None for base models with the plain layout)
FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**SIZES), LLAMA3),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**SIZES), CHATML),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**SIZES, head_dim=8), CHATML),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**SIZES), MISTRAL),
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**GEMMA), GEMMA2),
    "gemma3_text": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**GEMMA), GEMMA3),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**SIZES), PHI3),
    "olmo2": (Olmo2ForCausalLM, lambda: Olmo2Config(**SIZES), OLMO2),
    "gpt_neox": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(**NEOX), None),
    "cohere": (CohereForCausalLM, lambda: CohereConfig(**SIZES, use_qk_norm=True, logit_scale=0.5), COHERE),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(**GPT2), None),
}
FAST_DECODE = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gpt_neox", "cohere"}
NO_CLASSIFIER = {"cohere"}  # transformers has no ForSequenceClassification: polyalign's ScoreModel
PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily"]
MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."}]


def build_family(name: str, folder: Path) -> Path:
    """Save the family's tiny random causal LM and its tokenizer (template + special tokens) to folder."""
    cls, config, template = FAMILIES[name]
    tokenizer = load_tokenizer("stories260K")
    if template is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS.get(template, [])})
        tokenizer.chat_template = template
    config = config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(7)
    cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


def train(run_dir: Path, *args: str) -> dict:
    assert main(["train", *args, f"--output.run_dir={run_dir}"]) == 0
    return json.loads((run_dir / "summary.json").read_text())


QUIET = ["--eval.every=0", "--output.checkpoint_every=1", "--output.report=false", "--output.progress=false"]
ONLINE = ["--train.steps=1", "--rollout.prompts_per_step=2", "--rollout.samples_per_prompt=2",
          "--rollout.max_new_tokens=6", "--algo.updates_per_batch=1", "--algo.ppo_epochs=1",
          "--output.sample_every=0", *QUIET]  # fmt: skip
OFFLINE = ["configs/offline/dpo.yaml", "--train.steps=1", "--train.batch_size=2", "--train.warmup_steps=0",
           "--train.schedule=constant", "--data.max_length=48", "--data.max_prompt_length=32",
           "--data.train=tests/fixtures/data/pairs.jsonl", "--data.eval_fraction=0", *QUIET]  # fmt: skip


@pytest.fixture(scope="module")
def cohere_reward_model(family_dirs, tmp_path_factory) -> str:
    """A reward model trained (one step) on the Cohere family: a ScoreModel folder."""
    run = tmp_path_factory.mktemp("cohere_rm") / "run"
    train(run, *OFFLINE, "--loss.name=reward_model", f"--model.policy={family_dirs['cohere']}")
    assert (run / "model" / "score_head.json").is_file()
    return str(run / "model")


def _scores(model, tokenizer) -> torch.Tensor:
    enc = encode_texts(tokenizer, ["A happy cat.", "The dog was sad and"], 32)
    with torch.no_grad():
        return sequence_scores(model, enc["input_ids"], enc["attention_mask"])


def check_reward_model_run(run: Path, policy: Path, name: str) -> None:
    """The export loads by path; the step-1 checkpoint, loaded into a fresh scorer, scores the same."""
    exported, tokenizer = load_reward_model(str(run / "model"))
    assert isinstance(exported, ScoreModel) == (name in NO_CLASSIFIER)
    fresh, _ = load_score_model(str(policy), seed=123)
    load_model(fresh, str(run / "checkpoints" / "step_000001" / "reward_model.safetensors"))
    torch.testing.assert_close(_scores(fresh.eval(), tokenizer), _scores(exported, tokenizer))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_trainer_one_step(name, family_dirs, cohere_reward_model, tmp_path):
    policy = family_dirs[name]
    online = [
        *ONLINE,
        f"--model.policy={policy}",
        f"--reward.functions={{'model:{cohere_reward_model}': 1.0}}",
    ]
    assert train(tmp_path / "rloo", *online, "--algo.name=rloo")["steps"] == 1
    train(tmp_path / "ppo", *online, "--algo.name=ppo")
    resumed = train(tmp_path / "ppo", *online, "--algo.name=ppo", "--train.steps=2", "--resume")
    assert resumed["steps"] == 2
    offline = [*OFFLINE, f"--model.policy={policy}"]
    for loss in ("dpo", "sft"):
        train(tmp_path / loss, *offline, f"--loss.name={loss}")
        load_policy(str(tmp_path / loss / "model"))
    # LoRA with the family's default targets; the reference is the policy with its adapter disabled.
    lora = ["--model.lora={r: 4, save: merged}", "--reference.precompute=false"]
    train(tmp_path / "dpo_lora", *offline, "--loss.name=dpo", *lora)
    load_policy(str(tmp_path / "dpo_lora" / "model" / "merged"))
    train(tmp_path / "rm", *offline, "--loss.name=reward_model")
    check_reward_model_run(tmp_path / "rm", policy, name)
    train(tmp_path / "rm_lora", *offline, "--loss.name=reward_model", "--model.lora={r: 4, save: both}")
    merged, tokenizer = load_reward_model(str(tmp_path / "rm_lora" / "model" / "merged"))
    assert torch.isfinite(_scores(merged, tokenizer)).all()


def _batch(vocab: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts and right-padded completions of 2 rows, token ids >= 3 (no special tokens)."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids, completion_ids = (torch.randint(3, vocab, (2, n), generator=generator) for n in (6, 5))
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("name", FAMILIES)
def test_logprobs_and_rollouts_equal_the_hf_forward(name, family_dirs):
    model, tokenizer = load_policy(str(family_dirs[name]))
    model.eval()
    assert (unsupported_reason(model, 64) is None) == (name in FAST_DECODE)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(512)
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
        expected = logits[:, 5:-1].log_softmax(-1).gather(-1, completion_ids[..., None])[..., 0]
        got = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    torch.testing.assert_close(got, expected * completion_mask, atol=1e-5, rtol=0)

    engine = HFEngine(model, tokenizer)
    sampled = engine.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=3))
    with torch.no_grad():
        fresh = completion_logprobs(
            model, sampled.prompt_ids, sampled.prompt_mask, sampled.completion_ids, sampled.completion_mask
        )
    torch.testing.assert_close(sampled.logprobs, fresh, atol=1e-5, rtol=0)

    greedy = engine.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=8, temperature=0.0))
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0)
    rows = [
        row[: row.index(2) + 1] if 2 in row else row for row in out[:, inputs.input_ids.shape[1] :].tolist()
    ]
    lengths = greedy.completion_mask.sum(1).tolist()
    assert [row[:n] for row, n in zip(greedy.completion_ids.tolist(), lengths)] == rows


def _adapted(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_default_targets_are_every_linear_layer_but_the_head(name, family_dirs):
    """FAMILY_TARGETS names what peft's all-linear finds in the family; a list overrides it; the scorer's head
    trains in full on top of the adapted backbone."""
    model, _ = load_policy(str(family_dirs[name]))
    peft_pick = _maybe_include_all_linear_layers(PeftLoraConfig(target_modules="all-linear"), model)
    all_linear = {n.rsplit(".", 1)[-1] for n in peft_pick.target_modules}
    assert set(FAMILY_TARGETS[model.config.model_type]) == all_linear
    assert _adapted(apply_lora(model, LoraConfig(r=2))) == all_linear
    first = FAMILY_TARGETS[model.config.model_type][0]
    assert _adapted(
        apply_lora(load_policy(str(family_dirs[name]))[0], LoraConfig(target_modules=[first]))
    ) == {first}
    scorer = apply_lora(load_score_model(str(family_dirs[name]))[0], LoraConfig(r=2))
    trainable = {n for n, p in scorer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable), trainable
    assert any(".score." in n for n in trainable)


EXPECTED_PROMPTS = {  # MESSAGES rendered by each family's template
    "llama": "<s><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nTell me a story.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me a story.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "mistral": "<s>[INST] Be kind.\n\nTell me a story. [/INST]",  # no system role: merged
    "gemma2": "<s><start_of_turn>user\nBe kind.\n\nTell me a story.<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<s><|system|>\nBe kind.<|end|>\n<|user|>\nTell me a story.<|end|>\n<|assistant|>\n",
    "olmo2": "<s><|system|>\nBe kind.\n<|user|>\nTell me a story.\n<|assistant|>\n",
    "cohere": "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be kind.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
    "<|USER_TOKEN|>Tell me a story.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "gpt_neox": "\n\nSystem: Be kind.\n\nHuman: Tell me a story.\n\nAssistant:",  # base model: plain layout
}
EXPECTED_PROMPTS["qwen3"], EXPECTED_PROMPTS["gpt2"] = EXPECTED_PROMPTS["qwen2"], EXPECTED_PROMPTS["gpt_neox"]
# Gemma 3's own template merges the system turn the way polyalign merges it for Gemma 2's (which raises).
EXPECTED_PROMPTS["gemma3_text"] = EXPECTED_PROMPTS["gemma2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_template_renders_the_family_layout(name, family_dirs):
    tokenizer = load_tokenizer(str(family_dirs[name]))
    text = render_prompt(tokenizer, MESSAGES)
    assert text == EXPECTED_PROMPTS[name]
    ids = tokenize_prompt(tokenizer, MESSAGES)
    assert ids[0] == tokenizer.bos_token_id or name in ("qwen2", "qwen3")  # ChatML writes no BOS
    assert ids.count(tokenizer.bos_token_id) <= 1  # the template's BOS is not doubled
    for special in SPECIALS.get(FAMILIES[name][2], []):  # each special token of the layout is one token
        assert (special in text) == (tokenizer.convert_tokens_to_ids(special) in ids)


FSDP_FAMILIES = ["gpt_neox", "cohere", "gemma2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP_FAMILIES)
def test_fsdp_ppo_on_two_processes(name, family_dirs, cohere_reward_model, tmp_path):
    from tests.test_distributed import polyalign_train

    reward = f"--reward.functions={{'model:{cohere_reward_model}': 1.0}}"
    polyalign_train(2, tmp_path / "run", *ONLINE, "--algo.name=ppo", "--model.parallel=fsdp",
                    f"--model.policy={family_dirs[name]}", reward)  # fmt: skip
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1
