"""`polyalign eval`: an application of the core's judges and metrics.

- `config.py` EvalRunConfig: the model (and baseline) to judge, prompt set, generation, judge, metrics;
- `prompts.py` the evaluation prompt sets (XSafety, MGSM, Aya-layout files) and MGSM exact match;
- `run.py`    `run_eval(cfg)` and `cli_eval(config_path, overrides)`: generate, judge, summarise;
- `report.py` report.md + report.html with per-language plots.
"""
