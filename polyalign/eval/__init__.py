"""Evaluation in the core: judges (`judges.py`, the offline `lexicon.py`), their chat backends and robust client
(`backends.py`), built from config (`config.py`, `build.py`), and metrics (`metrics.py`). The same judges
serve eval, synth and judge-based rewards: one judge code path. The `polyalign eval` application (prompt
sets, the run, its report) is in the ring, `polyalign.recipes.evaluate`. Never imports `polyalign.train`.
"""
