"""Engine settings genfarm derives from a spec. GPU paths cannot run here (no GPU): these check the settings they
produce, which is what Ray and vLLM receive on a GPU cluster."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from genfarm.engine import engine_args, to_sampling_params, use_gpu, worker_resources
from genfarm.engine.settings import VLLM_ONLINE_MAX_NUM_SEQS
from genfarm.errors import UserError
from genfarm.models import ResolvedModel
from genfarm.serve.config import LimitsSpec
from genfarm.spec import EngineSpec, SamplingSpec, load_job

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


# What every engine gets from genfarm's own fields at their defaults.
OWN = {"model": "/models/m", "tokenizer": "/models/m", "dtype": "auto", "max_model_len": 2048,
       "tensor_parallel_size": 1, "seed": 0,
       "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}  # compact JSON


def test_cpu_engine_keeps_genfarms_measured_defaults():
    assert engine_args(LOCAL, EngineSpec(), gpu=False) == {
        **OWN, "max_num_seqs": 64, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30,
        "enable_chunked_prefill": False,  # vLLM's CPU sampler fails on seeded requests prefilled in chunks
    }


def test_one_gpu_gets_vllms_own_defaults_unless_the_job_file_sets_them():
    # no enforce_eager (vLLM's default: CUDA graphs), no max_num_seqs, no KV-cache size: vLLM decides them
    assert engine_args(LOCAL, EngineSpec(), gpu=True) == OWN
    args = engine_args(LOCAL, EngineSpec(max_num_seqs=512, enforce_eager=True), gpu=True)
    assert (args["max_num_seqs"], args["enforce_eager"]) == (512, True)
    assert engine_args(LOCAL, EngineSpec(enforce_eager=False), gpu=False)["enforce_eager"] is False


def test_gpu_worker_reserves_one_gpu_per_tensor_parallel_shard():
    spec = EngineSpec(tensor_parallel_size=4)
    assert use_gpu(spec, gpus_available=8)
    assert worker_resources(spec, 8) == {"num_cpus": 1.0, "num_gpus": 4}
    args = engine_args(LOCAL, spec, gpu=True)
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "mp"
    assert "kv_cache_memory_bytes" not in args  # GPUs size the cache from gpu_memory_utilization


def test_pipeline_stages_multiply_the_gpus_of_an_engine():
    spec = EngineSpec(tensor_parallel_size=2, vllm={"pipeline_parallel_size": 2})
    assert worker_resources(spec, 8) == {"num_cpus": 1.0, "num_gpus": 4}
    args = engine_args(LOCAL, spec, gpu=True)
    assert (args["pipeline_parallel_size"], args["distributed_executor_backend"]) == (2, "mp")


def test_engine_vllm_passes_through_and_wins_over_device_defaults_only():
    vllm = {"gpu_memory_utilization": 0.85, "max_num_batched_tokens": 16384, "quantization": "fp8",
            "enable_lora": True, "distributed_executor_backend": "ray"}
    args = engine_args(LOCAL, EngineSpec(tensor_parallel_size=2, vllm=vllm), gpu=True)
    assert {key: args[key] for key in vllm} == vllm  # "ray" over genfarm's "mp" for tensor-parallel engines
    assert "enforce_eager" not in args and "max_num_seqs" not in args
    # genfarm's own fields win (validation refuses them in engine.vllm; a spec built unvalidated still loses)
    unchecked = engine_args(LOCAL, EngineSpec.model_construct(vllm={"max_model_len": 99, "max_num_seqs": 1}), False)
    assert (unchecked["max_model_len"], unchecked["max_num_seqs"]) == (2048, 1)


def test_engine_args_are_vllms_engine_args():
    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    assert set(EngineSpec.vllm_arg_names()) == {field.name for field in dataclasses.fields(EngineArgs)}
    spec = EngineSpec(tensor_parallel_size=2, vllm={"gpu_memory_utilization": 0.9, "pipeline_parallel_size": 2})
    for gpu in (False, True):
        EngineArgs(**engine_args(HUB, spec, gpu))
        AsyncEngineArgs(**engine_args(HUB, spec, gpu))
    assert VLLM_ONLINE_MAX_NUM_SEQS == SchedulerConfig.DEFAULT_MAX_NUM_SEQS


def job_error(tmp_path, engine: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(f"input: {{path: x.jsonl}}\ntask: {{type: article}}\noutput: {{path: out}}\nengine: {engine}\n")
    with pytest.raises(UserError) as info:
        load_job(path)
    return str(info.value)


def test_engine_vllm_keys_are_checked_against_vllm(tmp_path):
    assert job_error(tmp_path, "{vllm: {gpu_memory_utilisation: 0.9}}").endswith(
        "job.yaml: engine.vllm.gpu_memory_utilisation: not a vLLM engine argument. "
        "Fix: did you mean 'gpu_memory_utilization'?")
    assert job_error(tmp_path, "{vllm: {max_model_len: 4096}}").endswith(
        "job.yaml: engine.vllm.max_model_len: genfarm sets this vLLM argument. Fix: set engine.max_model_len instead")
    assert "Fix: set sampling.seed instead" in job_error(tmp_path, "{vllm: {seed: 1}}")


def test_job_files_are_checked_without_importing_vllm(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: x.jsonl}\ntask: {type: article}\noutput: {path: out}\n"
                    "engine: {vllm: {gpu_memory_utilization: 0.9, quantization: awq}}\n")
    code = f"import sys; from genfarm.spec import load_job; load_job({str(path)!r}); print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_serve_concurrency_follows_the_engines_device_default():
    limits = LimitsSpec()
    assert limits.concurrency(EngineSpec(), gpu=False) == 64
    assert limits.concurrency(EngineSpec(), gpu=True) == VLLM_ONLINE_MAX_NUM_SEQS
    assert limits.concurrency(EngineSpec(device="gpu")) == VLLM_ONLINE_MAX_NUM_SEQS
    assert limits.concurrency(EngineSpec(max_num_seqs=8), gpu=True) == 8
    assert LimitsSpec(max_concurrent=5).concurrency(EngineSpec(), gpu=True) == 5


def test_fractional_gpus_and_forced_device():
    assert worker_resources(EngineSpec(gpus_per_worker=0.5), 1) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert not use_gpu(EngineSpec(device="cpu"), gpus_available=4)
    assert use_gpu(EngineSpec(device="gpu"), gpus_available=0)


def test_hub_models_pin_their_revision():
    assert engine_args(HUB, EngineSpec(), gpu=True)["revision"] == "v1.0"


def test_structured_output_constraint_reaches_sampling_params():
    from vllm import SamplingParams

    params = to_sampling_params(SamplingParams, SamplingSpec(temperature=0, max_tokens=4), 7,
                                {"structured": {"choice": ["a", "b"]}, "repetition_penalty": 1.2, "logprobs": 0})
    assert params.structured_outputs.choice == ["a", "b"] and params.seed == 7
    assert (params.repetition_penalty, params.logprobs) == (1.2, 0)
    assert to_sampling_params(SamplingParams, SamplingSpec(), 7).structured_outputs is None
