"""Engine settings derived from an EngineSpec: Ray resources per engine actor, vLLM's engine arguments, and the
process environment vLLM must find when it is imported.

Batch workers and the online service both build their engines from `engine_args`, so a job file and a serve config
that name the same model and engine settings get the same engine.
"""

from __future__ import annotations

import os
from typing import Any

from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec

GIB = 1 << 30


# What an engine gets where the job file leaves a setting out (None). On CPU the values genfarm's CPU benchmarks
# were measured with. On GPU nothing: vLLM's own defaults (CUDA graphs, and a max_num_seqs vLLM sizes for the GPU
# and the kind of engine: 256 for vllm.LLM on most GPUs, 1024 on H100-class ones).
CPU_DEFAULTS: dict[str, Any] = {"max_num_seqs": 64, "enforce_eager": True}
# vLLM's max_num_seqs for AsyncLLM (the online engine) on GPU when none is given: SchedulerConfig.DEFAULT_MAX_NUM_SEQS.
VLLM_ONLINE_MAX_NUM_SEQS = 128


def use_gpu(spec: EngineSpec, gpus_available: float) -> bool:
    return spec.device == "gpu" or (spec.device == "auto" and gpus_available > 0)


def gpus_per_engine(spec: EngineSpec) -> int:
    """GPUs one engine spans: its tensor-parallel shards times its pipeline stages."""
    return spec.tensor_parallel_size * int(spec.vllm.get("pipeline_parallel_size") or 1)


def worker_resources(spec: EngineSpec, gpus_available: float) -> dict[str, float]:
    """Ray resources of one engine actor: a parallel engine needs one GPU per shard and stage."""
    if not use_gpu(spec, gpus_available):
        return {"num_cpus": spec.cpus_per_worker, "num_gpus": 0}
    gpus = spec.gpus_per_worker if spec.gpus_per_worker is not None else gpus_per_engine(spec)
    return {"num_cpus": spec.cpus_per_worker, "num_gpus": gpus}


def engine_args(model: ResolvedModel, spec: EngineSpec, gpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs: the device's defaults, then `engine.vllm` over them, then
    genfarm's own fields over everything (`engine.vllm` may not name those, see EngineSpec.OWN_FIELDS)."""
    args: dict[str, Any] = {} if gpu else dict(CPU_DEFAULTS)
    # Structured answers as compact JSON: a model (a small one especially) cannot wander into whitespace until
    # max_tokens, and answers cost fewer tokens. vLLM reads this setting per engine only, and only for xgrammar.
    args["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if not gpu:
        # vLLM's CPU sampler cannot resume a seeded request whose prompt was prefilled in chunks ("CPU Generator
        # does not use offset"): the engine dies on jobs with long prompts, and every genfarm row is seeded.
        args["enable_chunked_prefill"] = False
    if gpu and gpus_per_engine(spec) > 1:
        # Inside a Ray actor that already holds the GPUs, worker processes beat a nested Ray placement.
        args["distributed_executor_backend"] = "mp"
    args.update(spec.vllm)
    args.update({
        "model": model.path,
        "tokenizer": model.path,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "seed": 0,
    })
    args.update({name: getattr(spec, name) for name in CPU_DEFAULTS if getattr(spec, name) is not None})
    if is_hub_model(model):  # pin the revision the user asked for
        args["revision"] = model.revision
    if not gpu:
        # The CPU backend's default memory check reads one NUMA node only; an explicit KV-cache size avoids it.
        args["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * GIB)
    return args


def online_max_num_seqs(spec: EngineSpec, gpu: bool) -> int:
    """Sequences the online engine decodes at once, whoever chose it: what a serve replica's limiter admits."""
    if spec.max_num_seqs is not None:
        return spec.max_num_seqs
    return VLLM_ONLINE_MAX_NUM_SEQS if gpu else CPU_DEFAULTS["max_num_seqs"]


def is_hub_model(model: ResolvedModel) -> bool:
    return model.path == model.name and not os.path.isdir(model.path)


def prepare_process_env(model: ResolvedModel, spec: EngineSpec, gpu: bool, in_process: bool = True) -> None:
    """Settings that must be in place before vLLM is imported in this process. The online engine (AsyncLLM)
    always runs its core in a separate process (`in_process=False`)."""
    if not is_hub_model(model):
        os.environ["HF_HUB_OFFLINE"] = "1"  # only a hub model the user named may reach a hub
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the user's (genfarm generate | ...)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not gpu and in_process:
        # In-process engine on CPU: ~2 s start instead of 12-15 s, and nothing leaks into /dev/shm if Ray kills us.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not gpu:
        # Ray sets OMP_NUM_THREADS to the actor's reserved CPUs (1), which would leave a CPU engine one core.
        os.environ["OMP_NUM_THREADS"] = str(spec.cpu_threads or os.cpu_count() or 1)
