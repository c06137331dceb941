"""Generators, translators and scorers for synthesis, built from config over the eval backends.

- `Generator.generate(prompts, seeds) -> completions`, one seed per prompt (the record's seed, see
  `stages.record_seed`): `LocalGenerator` (a causal LM through eval's local generator), `ChatGenerator` (any
  `polyalign.eval.backends.ChatClient`, built by `polyalign.recipes.evaluate.build`: an OpenAI-compatible endpoint or a
  local HF chat model, with retries, bounded concurrency and a request cache; each request sends its seed);
- `Translator.translate(texts, source_languages, target, seeds) -> texts`: `PromptTranslator` (any generator
  asked with a translation prompt) or `Seq2SeqTranslator` (NLLB or Marian through transformers, greedy);
- `Scorer.score(prompts, completions, languages) -> [(score | None, status)]`: a reward model, the lexicon
  or an LLM harm judge (score 1 = safe, 0 = harmful), or an LLM 1-10 rating. status "ok" | "unparseable" |
  "not_covered"; an unscored completion is skipped by pairing and counted.
Tests pass their own objects with these methods (scripted fakes), or a real server through `ChatGenerator`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from polyalign.recipes.evaluate.build import build_chat_client, build_judge
from polyalign.synth.config import TRANSLATE_TEMPLATE, BackendConfig, JudgeConfig

# BCP-47 -> FLORES-200 codes used by NLLB (the Aya 23 languages and a few more).
NLLB_CODES = {
    "ar": "arb_Arab", "bn": "ben_Beng", "cs": "ces_Latn", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn",
    "es": "spa_Latn", "fa": "pes_Arab", "fil": "tgl_Latn", "fr": "fra_Latn", "he": "heb_Hebr",
    "hi": "hin_Deva", "id": "ind_Latn", "it": "ita_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang", "nl": "nld_Latn",
    "pl": "pol_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "sr": "srp_Cyrl", "sw": "swh_Latn",
    "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl", "vi": "vie_Latn", "zh": "zho_Hans",
}  # fmt: skip
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fa": "Persian", "fil": "Filipino", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sr": "Serbian", "sw": "Swahili", "th": "Thai",
    "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip


class Generator(Protocol):
    name: str

    def describe(self) -> str: ...

    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]: ...


class Translator(Protocol):
    name: str

    def describe(self) -> str: ...

    def translate(
        self, texts: list[str], source_languages: list[str], target: str, seeds: list[int] | None = None
    ) -> list[str]: ...


class Scorer(Protocol):
    name: str

    def describe(self) -> str: ...

    def score(
        self, prompts: list[str], completions: list[str], languages: list[str]
    ) -> list[tuple[float | None, str]]: ...


class LocalGenerator:
    """A local causal LM (eval's HFChatBackend); `system` as in its `render`. Greedy (temperature 0): one batch
    per call. Sampled: one prompt per engine call with its own seed, because the engine draws one random stream
    per call, so a completion then depends on its prompt and seed only, never on its batch neighbours (the
    price: no batching while sampling locally; endpoints keep their concurrency)."""

    def __init__(self, cfg: BackendConfig) -> None:
        from polyalign.eval.backends import HFChatBackend

        self.chat, self.cfg, self.name = (
            HFChatBackend.load(cfg.model, "cpu", cfg.use_chat_template),
            cfg,
            cfg.label,
        )

    def describe(self) -> str:
        c = self.cfg
        return f"local model {c.model!r} (temperature {c.temperature}, top_p {c.top_p}, {c.max_new_tokens} tokens)"

    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        from polyalign.types import Sampling

        c = self.cfg
        texts = [self.chat.render(p, c.system) for p in prompts]
        sampling = lambda seed: Sampling(
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed
        )
        if c.temperature == 0:
            return self.chat.generate(texts, 1, sampling(0)).completions
        return [self.chat.generate([t], 1, sampling(s)).completions[0] for t, s in zip(texts, seeds)]


class ChatGenerator:
    """Completions from any ChatClient; the system message (e.g. a safety preamble) goes first."""

    def __init__(self, client: Any, cfg: BackendConfig) -> None:
        self.client, self.cfg, self.name = client, cfg, cfg.label

    def describe(self) -> str:
        return f"{self.client.describe()} (temperature {self.cfg.temperature})"

    def generate(self, prompts: list[str], seeds: list[int]) -> list[str]:
        c = self.cfg
        system = [{"role": "system", "content": c.system}] if c.system else []
        params = {"max_tokens": c.max_new_tokens, "temperature": c.temperature, "top_p": c.top_p}
        with ThreadPoolExecutor(max_workers=max(1, c.max_workers)) as pool:
            futures = [
                pool.submit(
                    self.client.complete_many,
                    [[*system, {"role": "user", "content": p}]],
                    {**params, "seed": s},
                )
                for p, s in zip(prompts, seeds)
            ]
        return [f.result()[0] for f in futures]


class PromptTranslator:
    """Translation by asking a generator with a translation prompt (greedy or sampled as configured)."""

    def __init__(self, generator: Generator, template: str = TRANSLATE_TEMPLATE, seed: int = 0) -> None:
        self.generator, self.template, self.seed = generator, template, seed
        self.name = generator.name

    def describe(self) -> str:
        return f"prompted translation by {self.generator.describe()}"

    def translate(
        self, texts: list[str], source_languages: list[str], target: str, seeds: list[int] | None = None
    ) -> list[str]:
        requests = [
            self.template.format(
                text=t, language=target, language_name=LANGUAGE_NAMES.get(target, target), source_language=s
            )
            for t, s in zip(texts, source_languages)
        ]
        return [c.strip() for c in self.generator.generate(requests, seeds or [self.seed] * len(texts))]


class Seq2SeqTranslator:
    """NLLB (one model, FLORES-200 language codes) or Marian (`model` may hold {src} and {tgt}, one model per
    language pair, e.g. Helsinki-NLP/opus-mt-{src}-{tgt}) through transformers, greedy (beam search off)."""

    def __init__(self, cfg: BackendConfig, device: str = "cpu") -> None:
        self.cfg, self.name, self.device = cfg, cfg.label, device
        self.is_nllb = "nllb" in cfg.model.lower()
        self._loaded: dict[str, tuple[Any, Any]] = {}

    def describe(self) -> str:
        return f"seq2seq translation model {self.cfg.model!r} ({'NLLB' if self.is_nllb else 'Marian'})"

    def _load(self, name: str) -> tuple[Any, Any]:
        if name not in self._loaded:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSeq2SeqLM.from_pretrained(name).to(self.device).eval()
            self._loaded[name] = (model, tokenizer)
        return self._loaded[name]

    def _code(self, language: str) -> str:
        base = language.split("-")[0]
        if self.is_nllb and base not in NLLB_CODES:
            raise ValueError(
                f"NLLB translator: no FLORES-200 code for {language!r}; known: {sorted(NLLB_CODES)}"
            )
        return NLLB_CODES[base] if self.is_nllb else base

    def _run(self, name: str, texts: list[str], source: str, target: str) -> list[str]:
        import torch

        model, tokenizer = self._load(name)
        kwargs = {}
        if self.is_nllb:
            tokenizer.src_lang = self._code(source)
            kwargs["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(self._code(target))
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, num_beams=1, **kwargs)
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    def translate(
        self, texts: list[str], source_languages: list[str], target: str, seeds: list[int] | None = None
    ) -> list[str]:
        out: list[str | None] = [None] * len(texts)
        for source in sorted(set(source_languages)):
            rows = [i for i, s in enumerate(source_languages) if s == source]
            name = self.cfg.model.format(src=self._code(source), tgt=self._code(target))
            for i, text in zip(rows, self._run(name, [texts[i] for i in rows], source, target)):
                out[i] = text
        return [t or "" for t in out]


def build_generator(cfg: BackendConfig, out_dir: Path) -> Generator:
    if cfg.kind == "local":
        return LocalGenerator(cfg)
    if cfg.kind in ("openai", "hf_chat"):
        return ChatGenerator(build_chat_client(cfg, out_dir), cfg)
    raise ValueError(f"generator {cfg.label}: kind {cfg.kind!r} cannot generate completions")


def build_translator(cfg: BackendConfig, template: str, out_dir: Path) -> Translator:
    if cfg.kind == "seq2seq":
        return Seq2SeqTranslator(cfg)
    return PromptTranslator(build_generator(cfg, out_dir), template, cfg.seed)


class JudgeScorer:
    """Scores from a judge: a reward model (RewardFn), or a pointwise judge (kind "harm": score 1 - harmful;
    kind "score": its number)."""

    def __init__(self, judge: Any, name: str) -> None:
        self.judge, self.name = judge, name

    def describe(self) -> str:
        return self.judge.describe() if hasattr(self.judge, "describe") else repr(self.judge)

    def score(self, prompts, completions, languages) -> list[tuple[float | None, str]]:
        if not hasattr(self.judge, "judge"):  # a RewardFn
            return [(float(s), "ok") for s in self.judge(list(prompts), list(completions))]
        out = []
        for j in self.judge.judge(list(prompts), list(completions), list(languages)):
            if j.score is None:
                out.append((None, j.status))
            else:
                out.append((1.0 - j.score if self.judge.kind == "harm" else float(j.score), "ok"))
        return out


def build_scorer(cfg: JudgeConfig, out_dir: Path) -> Scorer:
    names = {"reward_model": f"reward_model:{cfg.model}", "lexicon": "lexicon-harm"}
    name = names.get(cfg.kind, f"{cfg.kind}:{cfg.model}:{cfg.mode}")
    return JudgeScorer(build_judge(cfg, cfg.mode, out_dir), name)
