"""The cross-lingual transfer / safety-mixture experiment: `polyalign experiment CONFIG.yaml`.

- `config.py` ExperimentConfig: data (synth configs or pairs files), training sets (languages, safety share,
              global/local label), methods (dpo, sft_random, sft_chosen, dpo_sft, rloo), evaluation;
- `run.py`    `run_experiment(cfg)` and `cli_experiment(config_path, overrides)`;
- `report.py` the training set x evaluation language matrices: Markdown tables and PNG heatmaps.
"""
