"""Multilingual preference-data synthesis (SPEC 3.3, 7.6) and safety data (SPEC 2.3).

    polyalign synth CONFIG.yaml [--force-stage NAME] [--section.key=value ...]

- `config.py`    SynthConfig: source prompts, translation, generators, judge, pairing, filters;
- `store.py`     resumable JSONL stage files (fsynced appends keyed by record id, torn-line repair), progress;
- `fingerprints.py` settings hashes on every record: a rerun with changed settings refuses, --force-stage redoes;
- `sources.py`   prompt files in the long (Aya red-teaming) or wide (MultiJail) layout, renamed columns;
- `paths.py`     paths inside a config are relative to that config file;
- `langcheck.py` the script-based language check (counts prompts / completions in the wrong script);
- `backends.py`  generators (local HF model, any OpenAI-compatible endpoint), translators (prompted, NLLB,
                 Marian), scorers (reward model, lexicon or LLM harm judge, LLM rating);
- `stages.py`    translate -> generate -> score -> pair -> filter, each a function over records;
- `pipeline.py`  `run_synth(cfg)` and `cli_synth(config_path, overrides, force_stage)`;
- `safety.py`    red-team prompts (XSafety, Aya layout), the safety preamble, safety pair counts;
- `mixtures.py`  training mixtures with an exact share of safety pairs and global-only / local-only variants.
Imports nothing heavy at package import.
"""
