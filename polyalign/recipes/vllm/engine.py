"""VLLMEngine: rollouts from vLLM running inside the trainer's process, on the trainer's GPU (colocated).

vLLM is an optional extra, `pip install 'polyalign[vllm]'` on a CUDA machine, imported when an engine is
built. The engine meets the contract of `HFEngine` (rollout/hf.py), so trainers cannot tell the two apart:
- prompts are tokenized exactly as HFEngine does (same ids, same left padding); vLLM gets token ids only.
- every row is its own request (n=1) with its own seed, a hash of (sampling.seed, row_offset + row), so a
  row's completion does not depend on the other rows or on how a batch is split across processes.
- the policy's EOS ids are stop tokens; the mask includes the EOS. A stop string ends the row at the token
  that completed it and the text is cut before it.
- log-probs: with `logprobs_mode="processed_logprobs"` vLLM gives log-softmax(logits / temperature) after
  top-k/top-p filtering, our quantity when nothing is filtered (greedy rows use temperature 1). With
  top_k/top_p on, or a vLLM without `logprobs_mode` (raw logits: right only at temperature 0 or 1), the
  sampled tokens' log-probs come from one policy forward instead, as `last_logprobs_source` says.

Weights: vLLM starts from the policy's config and tokenizer with dummy weights; `load_weights(policy)` then
pushes the live parameters (PEFT merged, FSDP2 DTensors gathered) into vLLM's in-process model (so the
engine sets VLLM_ENABLE_V1_MULTIPROCESSING=0) and resets its prefix cache. Call it after every optimizer step.

Shapes: P prompts, G = n completions each, B = P * G rows, Tp prompt tokens, T completion tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from polyalign.logprobs import completion_logprobs, unwrap_peft
from polyalign.recipes.vllm.requests import collect_outputs, request_options, row_seeds, vllm_logprobs_exact
from polyalign.rollout.hf import HFEngine, _check_sampling
from polyalign.types import Rollout, Sampling

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, torch.compile and polyalign's TrainForward wrappers (PEFT stays)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "TrainForward":
            model = model.model
        else:
            return model


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, full tensor) of every weight, one at a time: merged weights of a PEFT model, FSDP2
    DTensors gathered (a collective: every rank must iterate)."""
    model = _unwrap(model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        from polyalign.lora import merged_state_dict  # only PEFT users need polyalign.lora

        state = merged_state_dict(model)
    else:
        state = model.state_dict()
    for name, tensor in state.items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
        yield name, tensor.detach()


def _engine_fields() -> set[str] | None:
    """Names EngineArgs accepts in this vLLM (None when they cannot be read)."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        return {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        return None


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VLLMEngine:
    """Rollout engine over an in-process vLLM that holds a copy of the policy's weights.

    `model` is the policy on CUDA (a transformers causal LM, optionally PEFT-, DDP- or FSDP2-wrapped);
    `model`, `tokenizer` and `add_special_tokens` are as in HFEngine, the other options are the fields of
    `rollout.vllm` (config.VLLMConfig, documented there). With `sleep_mode` vLLM's KV cache is freed and its
    weights moved to CPU memory (sleep level 1) between generate calls.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = False,
        max_model_len: int = 0,
        sleep_mode: bool = False,
        attention_backend: str = "",
        add_special_tokens: bool = True,
    ) -> None:
        try:
            import vllm
        except ImportError as err:
            hint = "pip install 'polyalign[vllm]' on a machine with a CUDA GPU"
            raise ImportError(f"rollout engine 'vllm' needs the 'vllm' package ({hint})") from err
        self._vllm = vllm
        if not torch.cuda.is_available():
            raise RuntimeError(
                "rollout engine 'vllm' needs a CUDA GPU and torch.cuda.is_available() is False; "
                "use rollout.engine: hf on this machine"
            )
        if not 0 < gpu_memory_utilization < 1 or max_model_len < 0:
            raise ValueError("VLLMEngine: need 0 < gpu_memory_utilization < 1 and max_model_len >= 0")
        # The encoder: HFEngine's prompt encoding, EOS ids and text decoding, so both engines agree exactly.
        self._hf = HFEngine(_unwrap(model), tokenizer, add_special_tokens=add_special_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.pad_id, self.eos_ids = self._hf.pad_id, self._hf.eos_ids
        self.max_model_len, self.sleep_mode = max_model_len, sleep_mode
        self.last_logprobs_source = "vllm"
        self._folder = tempfile.TemporaryDirectory(prefix="polyalign-vllm-")
        _write_model_folder(_unwrap(model), tokenizer, self._folder.name)
        fields = _engine_fields()
        self.logprobs_mode = "processed_logprobs" if fields and "logprobs_mode" in fields else "raw_logprobs"
        args = self._engine_args(model, fields, gpu_memory_utilization, enforce_eager, attention_backend)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core must share our process
        self.llm = self._vllm.LLM(**args)
        self._awake = {"weights", "kv_cache"}
        self._target = _find_vllm_model(self.llm)
        self.load_weights(model)

    def _engine_args(self, model, fields, memory: float, eager: bool, backend: str) -> dict:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"VLLMEngine: unsupported model dtype {dtype}; use one of {list(_DTYPE_NAMES)}")
        args = dict(
            model=self._folder.name,
            tokenizer=self._folder.name,
            dtype=_DTYPE_NAMES[dtype],
            load_format="dummy",  # random weights, replaced by the policy's right after start
            gpu_memory_utilization=memory,
            enforce_eager=eager,
            max_model_len=self.max_model_len or None,
            seed=torch.distributed.get_rank() if _world_size() > 1 else 0,
        )
        if self.sleep_mode:
            args["enable_sleep_mode"] = True
        if self.logprobs_mode == "processed_logprobs":
            args["logprobs_mode"] = "processed_logprobs"
        if backend and fields and "attention_backend" in fields:
            args["attention_backend"] = backend
        elif backend:
            os.environ["VLLM_ATTENTION_BACKEND"] = backend  # vLLM versions before the engine argument
        if _world_size() > 1:  # one engine per rank, inside the trainer's torch.distributed job
            args["distributed_executor_backend"] = "external_launcher"
        return args

    def load_weights(self, model: nn.Module) -> None:
        """Push `model`'s current weights into vLLM (every rank must call it) and drop cached prefixes."""
        self.model = model
        self._hf.load_weights(_unwrap(model))
        self._wake(("weights",))
        loaded = self._target.load_weights(policy_weights(model))
        if isinstance(loaded, set) and loaded:
            missing = {name for name, _ in self._target.named_parameters()} - loaded
            if missing:
                warnings.warn(
                    f"VLLMEngine.load_weights: vLLM got no weights for {sorted(missing)[:4]} "
                    f"({len(missing)} parameters); their names do not match the policy's",
                    stacklevel=2,
                )
        self.llm.reset_prefix_cache()

    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        todo = [t for t in tags if t not in self._awake]
        if not todo:
            return
        try:
            self.llm.wake_up(tags=todo)
        except TypeError:  # a vLLM whose wake_up takes no tags wakes everything
            self.llm.wake_up()
            todo = ["weights", "kv_cache"]
        self._awake.update(todo)

    def _sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)  # level 2 would also drop buffers that load_weights does not restore
            self._awake = set()

    def generate(self, prompts: list[str], n: int, sampling: Sampling, extras: dict | None = None) -> Rollout:
        """Sample n completions per prompt, group-major; see the module docstring for the details."""
        _check_sampling(prompts, n, sampling, extras)
        rows, offset = len(prompts) * n, sampling.row_offset
        if offset < 0 or offset + rows > (sampling.total_rows or rows):
            raise ValueError(
                f"sampling: rows {offset}..{offset + rows} do not fit in total_rows={sampling.total_rows}"
            )
        prompt_ids, prompt_mask = self._hf._encode(prompts, sampling.max_new_tokens)  # (P, Tp) each
        longest = int(prompt_mask.sum(1).max()) + sampling.max_new_tokens
        if self.max_model_len and longest > self.max_model_len:
            raise ValueError(
                f"a prompt plus max_new_tokens needs {longest} tokens, more than max_model_len="
                f"{self.max_model_len} (rollout.vllm.max_model_len)"
            )
        token_lists = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        options = request_options(sampling, self.eos_ids)
        seeds = row_seeds(sampling.seed, offset, rows)
        params = [self._vllm.SamplingParams(**options, seed=seed) for seed in seeds]
        requests = [{"prompt_token_ids": token_lists[r // n]} for r in range(rows)]
        self._wake()
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        finally:
            self._sleep()
        ids, mask, logprobs, finished, stopped, complete = collect_outputs(
            outputs, self.pad_id, self.tokenizer, sampling.stop_strings
        )
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = (t.repeat_interleave(n, 0).to(device) for t in (prompt_ids, prompt_mask))
        ids, mask, logprobs, finished = (t.to(device) for t in (ids, mask, logprobs, finished))
        self.last_logprobs_source = "vllm"
        if not (complete and vllm_logprobs_exact(sampling, self.logprobs_mode)):
            logprobs = self._policy_logprobs(prompt_ids, prompt_mask, ids, mask, sampling.temperature)
            self.last_logprobs_source = "policy"
        return Rollout(
            prompts=list(prompts),
            completions=self._hf._texts(ids, mask, stopped, sampling.stop_strings),
            group_size=n,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            completion_mask=mask,
            logprobs=logprobs * mask,
            finished=finished,
            extras={k: [v for v in values for _ in range(n)] for k, values in (extras or {}).items()},
        )

    def _policy_logprobs(self, prompt_ids, prompt_mask, ids, mask, temperature: float) -> torch.Tensor:
        """The sampled tokens' log-probs under the policy itself (B, T), when vLLM cannot give ours."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                logprobs = completion_logprobs(
                    self.model, prompt_ids, prompt_mask, ids, mask, temperature=temperature or 1.0
                )
        finally:
            self.model.train(was_training)
        return logprobs.clone()  # an ordinary tensor, outside inference mode

    def close(self) -> None:
        """Shut vLLM down and free its GPU memory (a later engine in this process starts clean)."""
        llm = self.__dict__.pop("llm", None)
        self._target = None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            gc.collect()
            if _world_size() == 1:  # vLLM's own single-process group; never the trainer's
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            torch.cuda.empty_cache()
        self._folder.cleanup()


def _write_model_folder(model: nn.Module, tokenizer, folder: str) -> None:
    """config.json (with its architecture named), generation_config.json and the tokenizer: what vLLM reads."""
    base = unwrap_peft(model)
    config = copy.deepcopy(base.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        try:
            generation.save_pretrained(folder)
        except ValueError:  # an invalid generation config: vLLM then uses the config's EOS
            pass
    tokenizer.save_pretrained(folder)


def _find_vllm_model(llm: Any) -> nn.Module:
    """vLLM's model object in this process (needs the in-process engine core)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and "MP" in type(core).__name__:
        raise RuntimeError(
            "vLLM runs its engine core in another process, so the policy's weights cannot be pushed in "
            "place; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is first used in this process"
        )
    getters = (
        lambda: llm.apply_model(lambda model: model)[0],
        lambda: llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model(),
        lambda: llm.llm_engine.model_executor.driver_worker.model_runner.get_model(),
        lambda: llm.llm_engine.model_executor.driver_worker.worker.model_runner.model,
    )
    for get in getters:
        try:
            model = get()
        except Exception:  # this vLLM lacks that route; try the next one
            continue
        if isinstance(model, nn.Module) and hasattr(model, "load_weights"):
            return model
    version = getattr(sys.modules.get("vllm"), "__version__", "?")
    raise RuntimeError(
        "cannot reach vLLM's model in this process (LLM.apply_model and the driver worker's model runner "
        f"are both missing in vllm {version}); VLLMEngine needs vllm>=0.10"
    )
