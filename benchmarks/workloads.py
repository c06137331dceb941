"""The benchmark workloads of /work/shared/BENCHMARKS.md, built deterministically for every backend.

Owns: the benchmark tokenizer (byte-level BPE, vocab 8192, trained once and stored in
`benchmarks/assets/tokenizer.json`), the tiny/small Llama models (random init from a seed), the RLOO prompts,
the DPO pairs (stored in `benchmarks/assets/dpo_pairs.jsonl`), the reward function and the fixed
hyper-parameters. Knows nothing about TRL or polyalign: builders return plain models, tokenizers and lists
so that `trl_rloo.py`, `trl_dpo.py` and the polyalign side (`run.py`) do identical work.

Rebuild the stored assets (only needed if they are deleted; it re-trains the tokenizer):
    python benchmarks/workloads.py --build-assets
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"
DPO_PAIRS_FILE = ASSETS / "dpo_pairs.jsonl"
SENTIMENT_DIR = REPO / "polyalign" / "assets" / "sentiment"
DPO_DEMO_FILE = Path("/work/shared/data/llamafactory_dpo_demo/dpo_en_demo.json")

# Fixed hyper-parameters shared by every backend (BENCHMARKS.md).
VOCAB_SIZE = 8192
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
NUM_THREADS = 2
STEPS = 20
WARMUP_STEPS = 3  # first steps excluded from the median
LR = 3e-4  # AdamW, constant schedule, no warmup
WEIGHT_DECAY = 0.0
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0  # TRL's default clipping; the polyalign side should clip at the same norm
SEED = 0
# Online (RLOO)
PROMPTS_PER_STEP = 4
SAMPLES_PER_PROMPT = 4  # k; 16 sequences per optimizer step
PROMPT_TOKENS = (9, 24)  # inclusive range of prompt lengths in tokens
MAX_NEW_TOKENS = 64
TEMPERATURE = 1.0
RLOO_BETA = 0.05
# Offline (DPO)
PAIRS_PER_STEP = 8
PAIR_TOKENS = (55, 91)  # inclusive range of prompt + completion + EOS tokens, per side
DPO_MAX_LENGTH = 128
DPO_BETA = 0.1

MODEL_SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
}  # fmt: skip
EXPECTED_PARAMS = {"tiny": 2_032_768, "small": 27_795_968}


def _sentiment_sentences() -> list[str]:
    """The 3,000 shipped UCI sentiment sentences, in file order."""
    sentences = []
    for name in ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt"):
        for line in (SENTIMENT_DIR / name).read_text(encoding="utf-8").splitlines():
            text = line.rsplit("\t", 1)[0].strip()
            if text:
                sentences.append(text)
    return sentences


def _dpo_demo_rows() -> list[dict]:
    if not DPO_DEMO_FILE.exists():
        raise FileNotFoundError(f"DPO demo data not found at {DPO_DEMO_FILE}; needed only to rebuild assets")
    return json.loads(DPO_DEMO_FILE.read_text(encoding="utf-8"))


def train_tokenizer() -> None:
    """Train the byte-level BPE on the shipped English text and save it to `TOKENIZER_FILE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = _sentiment_sentences()
    for row in _dpo_demo_rows():
        corpus += [turn["value"] for turn in row["conversations"]]
        corpus += [row["chosen"]["value"], row["rejected"]["value"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    ASSETS.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(TOKENIZER_FILE))


def build_tokenizer():
    """Load the stored benchmark tokenizer as a `PreTrainedTokenizerFast` (pad id 0, bos 1, eos 2).

    No special tokens are added when encoding: prompts are encoded as they are.
    """
    from transformers import PreTrainedTokenizerFast

    if not TOKENIZER_FILE.exists():
        raise FileNotFoundError(
            f"{TOKENIZER_FILE} missing; run `python benchmarks/workloads.py --build-assets`"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"{TOKENIZER_FILE} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def build_config(size: str = "tiny"):
    """The `LlamaConfig` of a benchmark size ("tiny" or "small"), tied embeddings, no dropout."""
    from transformers import LlamaConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    tokenizer_ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **MODEL_SIZES[size],
        **tokenizer_ids,
    )


def build_model(size: str = "tiny", seed: int = SEED, verbose: bool = True):
    """A randomly initialised fp32 `LlamaForCausalLM` of the given size; asserts the parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    config = build_config(size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"benchmark model {size}: {n_params:,} parameters")
    if n_params != EXPECTED_PARAMS[size]:
        raise RuntimeError(f"{size} model has {n_params:,} parameters, expected {EXPECTED_PARAMS[size]:,}")
    return model


def _truncate_words(text: str, tokenizer, max_tokens: int) -> tuple[str, int]:
    """Longest word prefix of `text` with at most `max_tokens` tokens, and its token count."""
    words = text.split()
    best, best_len = "", 0
    for end in range(1, len(words) + 1):
        candidate = " ".join(words[:end])
        n = len(tokenizer(candidate)["input_ids"])
        if n > max_tokens:
            break
        best, best_len = candidate, n
    return best, best_len


def rloo_prompts(n: int = PROMPTS_PER_STEP, seed: int = SEED, tokenizer=None) -> list[str]:
    """`n` prompts of 9-24 tokens: shipped sentiment sentences, shuffled by `seed`, cut at a word boundary
    to a per-prompt target length drawn uniformly from `PROMPT_TOKENS`.

    Step `i` of a benchmark uses prompts `[i * PROMPTS_PER_STEP, (i + 1) * PROMPTS_PER_STEP)`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokenizer = tokenizer or build_tokenizer()
    rng = random.Random(seed)
    sentences = _sentiment_sentences()
    rng.shuffle(sentences)
    low, high = PROMPT_TOKENS
    prompts = []
    for sentence in sentences:
        text, length = _truncate_words(sentence, tokenizer, rng.randint(low, high))
        if low <= length:
            prompts.append(text)
        if len(prompts) == n:
            return prompts
    raise ValueError(f"only {len(prompts)} prompts of {low}-{high} tokens available, asked for {n}")


def _fit_completion(prompt: str, completion: str, tokenizer, target: int) -> str | None:
    """Cut `completion` so that prompt + completion + EOS is exactly `target` tokens, or None."""
    budget = target - 1 - len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(completion)["input_ids"]
    if budget < 8 or len(ids) < budget:
        return None
    cut = tokenizer.decode(ids[:budget])
    if len(tokenizer(prompt + cut)["input_ids"]) + 1 != target:
        return None
    return cut


def build_dpo_pairs(seed: int = SEED) -> list[dict]:
    """Derive fixed-length pairs from the LLaMA-Factory English DPO demo (see assets/PROVENANCE.md)."""
    tokenizer = build_tokenizer()
    rng = random.Random(seed)
    low, high = PAIR_TOKENS
    pairs = []
    for index, row in enumerate(_dpo_demo_rows()):
        question = " ".join(row["conversations"][-1]["value"].split())
        question, _ = _truncate_words(question, tokenizer, rng.randint(12, 28))
        prompt = f"Question: {question}\nAnswer:"
        chosen = _fit_completion(prompt, " " + row["chosen"]["value"], tokenizer, rng.randint(low, high))
        rejected = _fit_completion(prompt, " " + row["rejected"]["value"], tokenizer, rng.randint(low, high))
        if question and chosen and rejected:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source_row": index})
    return pairs


def dpo_pairs(n: int = PAIRS_PER_STEP * STEPS, seed: int = SEED) -> list[dict]:
    """`n` stored pairs {"prompt", "chosen", "rejected"} (each side 55-91 tokens with EOS), shuffled by `seed`.

    Texts are raw strings; the completions start with a space, so prompt + completion tokenizes cleanly.
    """
    rows = [json.loads(line) for line in DPO_PAIRS_FILE.read_text(encoding="utf-8").splitlines()]
    if not 1 <= n <= len(rows):
        raise ValueError(f"n must be in [1, {len(rows)}] (stored pairs), got {n}")
    random.Random(seed).shuffle(rows)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n]]


def reward_fn(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Cheap deterministic reward: the share of letters and spaces in the completion, in [0, 1].

    Returns a plain list (TRL's reward contract); wrap it in `torch.tensor` for polyalign's `RewardFn`.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [sum(c.isalpha() or c == " " for c in text) / max(1, len(text)) for text in completions]


def build_assets() -> None:
    """Train the tokenizer and write the DPO pairs; both are committed, so this runs once."""
    train_tokenizer()
    pairs = build_dpo_pairs()
    DPO_PAIRS_FILE.write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"
    )
    print(f"wrote {TOKENIZER_FILE} and {len(pairs)} pairs to {DPO_PAIRS_FILE}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-assets", action="store_true", help="re-train the tokenizer, rewrite pairs")
    if parser.parse_args().build_assets:
        build_assets()
    else:
        parser.print_help()


def benchmark_args(description: str, extra=None) -> argparse.Namespace:
    """The command line every benchmark script shares (--size, --steps, --threads, --torch-profile); `extra`
    adds script-specific options to the parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=NUM_THREADS)
    parser.add_argument(
        "--torch-profile", type=int, metavar="STEP", help="profile this step (0-based) to stderr"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args
