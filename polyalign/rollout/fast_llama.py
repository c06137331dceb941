"""The fast decode path under its first name, for older imports (tests and user code); the code
lives in `fast_decode` (the maths) and `fast_families` (which models it runs)."""

from polyalign.rollout.fast_decode import FastDecoder as FastLlama
from polyalign.rollout.fast_families import unsupported_reason

__all__ = ["FastLlama", "unsupported_reason"]
