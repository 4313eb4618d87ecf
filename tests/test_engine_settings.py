"""Engine settings genfarm derives from a spec. GPU paths cannot run here (no GPU): these check the settings they
produce, which is what Ray and vLLM receive on a GPU cluster."""

from __future__ import annotations

from genfarm.engine import engine_args, to_sampling_params, use_gpu, worker_resources
from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec, SamplingSpec

LOCAL = ResolvedModel("m", "/models/m", "local-abc")
HUB = ResolvedModel("org/model", "org/model", "v1.0")


def test_cpu_engine_gets_explicit_kv_cache_and_one_cpu():
    spec = EngineSpec(kv_cache_gib=2, max_num_seqs=16, max_model_len=1024)
    assert not use_gpu(spec, gpus_available=0)
    assert worker_resources(spec, 0) == {"num_cpus": 1.0, "num_gpus": 0}
    args = engine_args(LOCAL, spec, gpu=False)
    assert args["kv_cache_memory_bytes"] == 2 << 30
    assert (args["max_num_seqs"], args["max_model_len"], args["model"]) == (16, 1024, "/models/m")
    assert "revision" not in args and "distributed_executor_backend" not in args


def test_gpu_worker_reserves_one_gpu_per_tensor_parallel_shard():
    spec = EngineSpec(tensor_parallel_size=4)
    assert use_gpu(spec, gpus_available=8)
    assert worker_resources(spec, 8) == {"num_cpus": 1.0, "num_gpus": 4}
    args = engine_args(LOCAL, spec, gpu=True)
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "mp"
    assert "kv_cache_memory_bytes" not in args  # GPUs size the cache from gpu_memory_utilization


def test_fractional_gpus_and_forced_device():
    assert worker_resources(EngineSpec(gpus_per_worker=0.5), 1) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert not use_gpu(EngineSpec(device="cpu"), gpus_available=4)
    assert use_gpu(EngineSpec(device="gpu"), gpus_available=0)


def test_hub_models_pin_their_revision():
    assert engine_args(HUB, EngineSpec(), gpu=True)["revision"] == "v1.0"


def test_structured_output_constraint_reaches_sampling_params():
    from vllm import SamplingParams

    params = to_sampling_params(SamplingParams, SamplingSpec(temperature=0, max_tokens=4), 7, {"choice": ["a", "b"]})
    assert params.structured_outputs.choice == ["a", "b"] and params.seed == 7
    assert to_sampling_params(SamplingParams, SamplingSpec(), 7).structured_outputs is None
