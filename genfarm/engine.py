"""The only module that touches vLLM: engine settings, prompt encoding, generation.

Batch workers and the online service both build their engines from `engine_args`, so a job file and a serve config
that name the same model and engine settings get the same engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec, SamplingSpec

GIB = 1 << 30


def use_gpu(spec: EngineSpec, gpus_available: float) -> bool:
    return spec.device == "gpu" or (spec.device == "auto" and gpus_available > 0)


def worker_resources(spec: EngineSpec, gpus_available: float) -> dict[str, float]:
    """Ray resources of one engine actor: tensor-parallel engines need one GPU per shard."""
    if not use_gpu(spec, gpus_available):
        return {"num_cpus": spec.cpus_per_worker, "num_gpus": 0}
    gpus = spec.gpus_per_worker if spec.gpus_per_worker is not None else spec.tensor_parallel_size
    return {"num_cpus": spec.cpus_per_worker, "num_gpus": gpus}


def engine_args(model: ResolvedModel, spec: EngineSpec, gpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs, from genfarm's engine spec."""
    args: dict[str, Any] = {
        "model": model.path,
        "tokenizer": model.path,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "enforce_eager": spec.enforce_eager,
        "seed": 0,
    }
    if is_hub_model(model):  # pin the revision the user asked for
        args["revision"] = model.revision
    if gpu:
        if spec.tensor_parallel_size > 1:
            # Inside a Ray actor that already holds the GPUs, worker processes beat a nested Ray placement.
            args["distributed_executor_backend"] = "mp"
    else:
        # The CPU backend's default memory check reads one NUMA node only; an explicit KV-cache size avoids it.
        args["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * GIB)
    return args


def is_hub_model(model: ResolvedModel) -> bool:
    return model.path == model.name and not os.path.isdir(model.path)


def prepare_process_env(model: ResolvedModel, gpu: bool) -> None:
    """Settings that must be in place before vLLM is imported in this process."""
    if not is_hub_model(model):
        os.environ["HF_HUB_OFFLINE"] = "1"  # only a hub model the user named may reach a hub
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not gpu:
        # In-process engine on CPU: ~2 s start instead of 12-15 s, and nothing leaks into /dev/shm if Ray kills us.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@dataclass
class Completion:
    text: str
    finish_reason: str
    completion_tokens: int
    index: int = 0


@dataclass
class Generation:
    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)


class PromptTooLong(ValueError):
    pass


class Engine:
    """A vLLM engine in this process, fed token ids so that every prompt is checked before it reaches vLLM."""

    def __init__(self, model: ResolvedModel, spec: EngineSpec, gpu: bool = False):
        prepare_process_env(model, gpu)
        from vllm import LLM

        self.model, self.spec = model, spec
        self.llm = LLM(**engine_args(model, spec, gpu))
        self.tokenizer = self.llm.get_tokenizer()

    def render(self, messages: list[dict] | None, text: str | None) -> str:
        """The exact prompt text: chat messages through the model's chat template, or a raw prompt as is."""
        if messages is None:
            return text
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """Token ids of a rendered prompt; over-long prompts are cut from the left or refused, per the spec."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        limit = self.spec.max_model_len - min(max_tokens, self.spec.max_model_len // 2)
        if len(ids) > limit:
            if self.spec.long_prompts == "error":
                raise PromptTooLong(
                    f"prompt has {len(ids)} tokens; max_model_len {self.spec.max_model_len} leaves room for {limit}"
                    " beside max_tokens (raise engine.max_model_len or set engine.long_prompts: truncate)"
                )
            ids = ids[-limit:]
        return ids

    def generate(self, prompts: list[list[int]], sampling: list[SamplingSpec], seeds: list[int | None]) -> list:
        """One Generation per prompt, or the exception that prompt alone raised; one bad prompt never sinks the rest."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [to_sampling_params(SamplingParams, s, seed) for s, seed in zip(sampling, seeds)]
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        try:
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        except Exception:  # noqa: BLE001 - isolate the culprit: retry one by one
            if len(inputs) == 1:
                raise
            return [self._generate_one(i, p) for i, p in zip(inputs, params)]
        return [to_generation(out) for out in outputs]

    def _generate_one(self, prompt, params):
        try:
            return to_generation(self.llm.generate([prompt], [params], use_tqdm=False)[0])
        except Exception as err:  # noqa: BLE001 - reported as this row's error
            return err


def to_sampling_params(cls, spec: SamplingSpec, seed: int | None):
    return cls(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        seed=seed,
        stop=list(spec.stop) or None,
    )


def to_generation(output) -> Generation:
    return Generation(
        prompt_tokens=len(output.prompt_token_ids),
        completions=[
            Completion(c.text, c.finish_reason or "unknown", len(c.token_ids), c.index) for c in output.outputs
        ],
    )
