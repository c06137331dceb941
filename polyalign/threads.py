"""CPU threads that hold up when the cores are shared (docs/threads.md has the measurements).

torch's CPU wheel runs its parallel regions on GNU OpenMP (libgomp), whose waiting threads spin 300,000
times before they sleep. Beside another CPU-bound process a spinning thread burns the time its descheduled
sibling needs, and a step of many small ops slowed 3x (one busy process) to 30x (a busy machine). The
`polyalign` command therefore sets `RUNTIME_DEFAULTS` before torch is imported, unless the environment
already sets them or OMP_WAIT_POLICY; library users set them themselves, before `import torch`. Every
command's `threads` setting (train: model.threads) then goes through `apply_threads`.
"""

from __future__ import annotations

import os

RUNTIME_DEFAULTS = {"GOMP_SPINCOUNT": "3000"}  # ~100x fewer spins; the thread count stays torch's


def set_runtime_defaults() -> None:
    """Put `RUNTIME_DEFAULTS` into the environment where unset (and no OMP_WAIT_POLICY is set, which decides
    the spin count itself); only effective before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        for key, value in RUNTIME_DEFAULTS.items():
            os.environ.setdefault(key, value)


def apply_threads(threads: int) -> None:
    """torch.set_num_threads(threads) when threads > 0; 0 keeps the process's current setting."""
    if threads < 0:
        raise ValueError(f"threads: {threads} must be >= 0 (0 = the command's default)")
    if threads:
        import torch

        torch.set_num_threads(threads)
