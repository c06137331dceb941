"""Multilingual preference-data synthesis (SPEC 3.3, 7.6) and safety data (SPEC 2.3).

    polyalign synth CONFIG.yaml [--section.key=value ...]

- `config.py`    SynthConfig: source prompts, translation, generators, judge, pairing, filters;
- `store.py`     resumable JSONL stage files (fsynced appends keyed by record id, torn-line repair);
- `langcheck.py` the script-based language check (counts prompts / completions in the wrong script);
- `backends.py`  generators (local HF model, any OpenAI-compatible endpoint), translators (prompted, NLLB,
                 Marian), scorers (reward model, lexicon or LLM harm judge, LLM rating);
- `stages.py`    translate -> generate -> score -> pair -> filter, each a function over records;
- `pipeline.py`  `run_synth(cfg)` and `cli_synth(config_path, overrides)`;
- `safety.py`    red-team prompts (XSafety, Aya layout), the safety preamble, safety pair counts;
- `mixtures.py`  training mixtures with an exact share of safety pairs and global-only / local-only variants.
Imports nothing heavy at package import.
"""
