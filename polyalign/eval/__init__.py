"""Evaluation in the core: judges, their chat backends, metrics.

- `judges.py`   the Judge protocols (pairwise A/B/tie with position swap; pointwise harmful yes/no or a
                numeric score), prompt templates, verdict parsing, the LLM and reward-model judges;
- `backends.py` chat backends (OpenAI-compatible endpoint, local Hugging Face model) behind `ChatClient`,
                which adds bounded concurrency, timeouts, retries with backoff and an on-disk cache; the
                local backend is also the one local generator of eval, synth and serve;
- `build.py`    chat clients and judges built from config (`EndpointConfig`, `JudgeConfig`), for eval,
                synth and the experiment alike;
- `lexicon.py`  the offline LDNOOBW lexicon harm judge (the default; a crude proxy);
- `metrics.py`  win-rate with a tie policy, bootstrap intervals, harm rates per group, relative reduction;
- `config.py`   `EndpointConfig` (how to reach a chat model) and `JudgeConfig`.

The `polyalign eval` command (prompt sets, generation, the run, its report) is an application of these, in
the ring: `polyalign.recipes.evaluate`.
The same judges serve judge-based rewards (`polyalign.rewards`), so there is one judge code path. This
package never imports `polyalign.train`.
"""
