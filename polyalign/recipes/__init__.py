"""The ring: applications built from the core, which the core never imports.

- `back_to_basics.py`, `copg_bandit.py`, `copg_offline.py`, `dpo_on_samples.py`: the papers' experiments in
  miniature (`polyalign repro ...`);
- `experiment/`: the cross-lingual transfer / safety-mixture runner (`polyalign experiment CONFIG.yaml`);
- `plan.py`, `plan_counts.py`: the memory planner (`polyalign plan`);
- `serve.py`: an OpenAI-compatible chat server over any loadable model (`polyalign serve`);
- `sentiment_rm.py`, `sentiment_data.py`: how the shipped sentiment reward model was trained
  (`bash scripts/train_sentiment_rm.sh`).

The synthesis pipeline is the other part of the ring, `polyalign/synth/`.
"""
