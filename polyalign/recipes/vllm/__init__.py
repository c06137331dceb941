"""The vLLM rollout engine (GPU, optional extra `polyalign[vllm]`), a plugin of the core's engine registry.

Importing this package registers `rollout.engine: vllm` (`polyalign train` does so when a config asks for
it; a Python caller imports it first). The core trainer needs only the `Engine` protocol; this engine,
colocated with the trainer, receives the live weights after every update.

- `engine.py`   `VLLMEngine`: built from the policy's config with dummy weights, weights pushed per update;
- `requests.py` per-row seeds, sampling options and the conversion of vLLM outputs into a `Rollout`.
"""

from polyalign.rollout import register_engine

register_engine("vllm", "polyalign.recipes.vllm.engine:VLLMEngine")
