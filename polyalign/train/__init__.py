"""Trainers and the plumbing they share.

- `loop.py`: the one trainer skeleton (start, loop, evaluate, checkpoint, resume, finish).
- `optim.py`: optimizer, learning-rate schedule, guarded optimizer step, micro-batching, seeding.
- `checkpoint.py`: crash-safe checkpoints (atomic directory rename + COMPLETE marker); `distributed.py` and
  `distributed_checkpoint.py`: processes, DDP/FSDP wrapping, gathering shards (lower layers, in that order).
- `logging.py`: JSONL metrics logger (TensorBoard when installed), progress bar, rank-0 printing.
- Online: `run.py` (the run holder), `online.py` (phases and step), `ppo.py`.
- Offline: `offline_run.py` (the run holder, reference cache, summary), `offline.py` (phases, losses, step),
  `offline_data.py` (pairs).

Trainers plug their step, evaluation, "is better" rule and summary into `loop.py`; there is no trainer base
class. Only `polyalign.cli` and the ring (`polyalign.recipes`) import this package.
"""
