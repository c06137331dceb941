"""Trainers and the plumbing they share.

- `loop.py`: optimizer, learning-rate schedule, guarded optimizer step, micro-batching, seeding, autocast.
- `checkpoint.py`: crash-safe checkpoints (atomic directory rename + COMPLETE marker) and atomic file writes.
- `logging.py`: JSONL metrics logger (TensorBoard when installed), progress bar, rank-0 printing.

The trainers (`online.py`, `ppo.py`, `offline.py`, ...) are loops of named phases that call these functions;
there is no trainer base class. Nothing outside `polyalign.cli` imports this package.
"""
