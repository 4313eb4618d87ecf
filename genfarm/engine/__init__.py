"""The only package that touches vLLM, and only inside functions: importing it imports neither vLLM nor torch.

settings  Ray resources per engine actor, vLLM's engine arguments, the process environment vLLM needs
prompts   chat rendering and prompt-length checks, shared by both engines
outputs   SamplingSpec -> vLLM sampling parameters, vLLM outputs -> Generation/Completion
batch     Engine: a vLLM engine in this process with one loop thread that several in-flight batches feed
online    AsyncEngine: vLLM's streaming AsyncLLM for the serve replicas
"""

from genfarm.engine.batch import Engine, EngineDead
from genfarm.engine.online import AsyncEngine, InvalidRequest
from genfarm.engine.outputs import Completion, Generation, to_sampling_params
from genfarm.engine.prompts import ChatTemplateRefused, PromptTooLong
from genfarm.engine.settings import engine_args, prepare_process_env, use_gpu, worker_resources

__all__ = [
    "AsyncEngine",
    "ChatTemplateRefused",
    "Completion",
    "Engine",
    "EngineDead",
    "Generation",
    "InvalidRequest",
    "PromptTooLong",
    "engine_args",
    "prepare_process_env",
    "to_sampling_params",
    "use_gpu",
    "worker_resources",
]
