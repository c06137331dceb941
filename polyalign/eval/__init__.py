"""Evaluation in the core: the judges (`judges.py`), their chat backends and robust client (`backends.py`) and
their settings (`config.py`). The same judges serve eval, synth and judge-based rewards: one judge code path.
The `polyalign eval` application is in the ring, `polyalign.recipes.evaluate`: prompt sets, the run, building
clients and judges from config (`build.py`), the offline lexicon harm judge (`lexicon.py`), win-rate and harm
metrics with intervals (`metrics.py`) and the report. Never imports `polyalign.train`.
"""
