"""CPU threads that hold up when the cores are shared (docs/threads.md has the measurements).

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp), whose idle threads spin before they
sleep. Beside another CPU-bound process a spinning thread burns the time slice its sibling needs, and a
step of many small ops slowed 10-70x. The `polyalign` command therefore sets, before torch is imported,
`RUNTIME_DEFAULTS` (a value already in the environment wins). Library users set these variables themselves,
before `import torch`. Every command's `threads` setting (train: model.threads) then goes through
`apply_threads`: N > 0 = torch.set_num_threads(N); 0 = keep the process's setting (the command's default).
"""

from __future__ import annotations

import os

RUNTIME_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}  # waiting threads sleep at once; torch keeps its count


def set_runtime_defaults() -> None:
    """Put `RUNTIME_DEFAULTS` into the environment where unset; only effective before torch is imported."""
    for key, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(key, value)


def apply_threads(threads: int) -> None:
    """torch.set_num_threads(threads) when threads > 0; 0 keeps the process's current setting."""
    if threads < 0:
        raise ValueError(f"threads: {threads} must be >= 0 (0 = the command's default)")
    if threads:
        import torch

        torch.set_num_threads(threads)
