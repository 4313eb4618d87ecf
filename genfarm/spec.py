"""Typed job specs loaded from YAML, with `--set key.sub=value` overrides.

Every model forbids unknown fields, so a typo in a job file is an error that names the field instead of a
setting that silently does nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from genfarm.errors import UserError
from genfarm.storage import Location, StorageOptions


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Spec):
    path: str = Field(description="File, folder, glob or URI (s3://, gs://, ...) of Parquet, JSONL or CSV rows.")
    format: Literal["auto", "parquet", "jsonl", "csv", "text", "openai-batch"] = Field(
        "auto", description="auto goes by file extension (and a JSONL file of OpenAI batch requests by its shape); "
        "text: each file is one document (Markdown or plain text); openai-batch: OpenAI's batch input file."
    )
    id_column: str | None = Field(None, description="Column holding a unique row id; default: FILE:ROW_NUMBER.")
    limit: int | None = Field(None, ge=1, description="Only the first N rows of each file (for trying a job out).")
    storage_options: StorageOptions = Field(default_factory=dict, description="For a URI: arguments of pyarrow's "
                                            "filesystem (S3: endpoint_override, region, access_key, secret_key...); "
                                            "by default the standard environment (AWS_*). Secrets stay out of the "
                                            "manifest.")

    @model_validator(mode="after")
    def _located(self) -> InputSpec:
        object.__setattr__(self, "path", Location(self.path, self.storage_options))  # opened with its options
        return self


class TaskConfig(Spec):
    """The `task:` section of a job file. Each task module subclasses it with `type: Literal["NAME"]` and its own
    fields; subclassing registers it, so the job spec, its errors and the serve config know every task."""

    type: str
    menu_order: ClassVar[int] = 100  # where the task is listed in help and errors (built-ins first)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.task_type()
        if name is not None:
            TASK_CONFIGS[name] = cls

    @classmethod
    def task_type(cls) -> str | None:
        """The `type:` value this config answers to (None for an abstract base)."""
        values = get_args(cls.model_fields["type"].annotation)
        return values[0] if values else None


TASK_CONFIGS: dict[str, type[TaskConfig]] = {}
BUILTIN_TASKS = "genfarm.tasks"  # every module in this package is a task module
PLUGIN_GROUP = "genfarm.tasks"  # entry points of installed packages that add tasks


@cache
def discover_tasks() -> None:
    """Import the built-in task modules and those of installed plugin packages, once: importing one registers it."""
    package = importlib.import_module(BUILTIN_TASKS)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{BUILTIN_TASKS}.{module.name}")
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry.load()


def task_types() -> list[str]:
    discover_tasks()
    return sorted(TASK_CONFIGS, key=lambda name: (TASK_CONFIGS[name].menu_order, name))


def task_config_class(name: object) -> type[TaskConfig]:
    """The config model of task type `name`; an unknown one is a ValueError with the known types as its fix."""
    discover_tasks()
    if name is None:
        raise ValueError(f"task.type is missing. Fix: use one of: {', '.join(task_types())}")
    if not isinstance(name, str) or name not in TASK_CONFIGS:
        close = difflib.get_close_matches(str(name), task_types(), n=1)
        hint = f"did you mean '{close[0]}'? Known types: " if close else "use one of: "
        raise ValueError(f"unknown task type {name!r}. Fix: {hint}{', '.join(task_types())}")
    return TASK_CONFIGS[name]


def load_plugins(modules: list[str]) -> list[str]:
    """Import task modules named in a job file or serve config (`plugins:`), which registers their tasks."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the user's to fix
            raise ValueError(f"cannot import {name!r} ({type(err).__name__}: {err}). Fix: put the module on "
                             "PYTHONPATH on every node, or install its package") from None
    return modules


def _as_task_config(value: Any, handler: Any) -> TaskConfig:
    if isinstance(value, TaskConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"task is a mapping with a type, got {value!r}. Fix: write e.g. task: {{type: article}}")
    return task_config_class(value.get("type")).model_validate(value)


# A job's task: whichever registered config its `type` names, serialized with all of that config's fields.
TaskSection = Annotated[SerializeAsAny[TaskConfig], WrapValidator(_as_task_config)]


class ModelSpec(Spec):
    name: str = Field("smollm2-135m-instruct", description="Registry name, local model folder, or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for hub models.")


class EngineSpec(Spec):
    """The engine section. `None` means the device's default (genfarm.engine.settings decides): on CPU genfarm's
    measured values, on GPU vLLM's own."""

    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int | None = Field(
        None, ge=1, description="Sequences an engine decodes at once; default: 64 on CPU, vLLM's own on GPU."
    )
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache size per engine, in GiB.")
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="Default: tensor_parallel_size on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each engine actor reserves in Ray.")
    cpu_threads: int | None = Field(None, ge=1, description="Threads of a CPU engine; default: every core of its "
                                    "machine (Ray would otherwise give it one thread per reserved CPU).")
    enforce_eager: bool | None = Field(
        None, description="Skip torch.compile and CUDA graphs; default: true on CPU, vLLM's own (false) on GPU."
    )
    request_timeout_s: float | None = Field(
        600, gt=0, description="A request still generating after this many seconds becomes a timeout error row."
    )
    long_prompts: Literal["error", "truncate"] = Field(
        "error", description="A prompt too long for max_model_len becomes an error row, or is cut from the left."
    )
    vllm: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments (fields of vllm.engine.arg_utils."
        "EngineArgs, e.g. gpu_memory_utilization, quantization); they win over the device defaults.",
    )

    # vLLM engine arguments genfarm sets from its own fields: `vllm:` refuses them and names the field instead.
    OWN_FIELDS: ClassVar[dict[str, str]] = {
        "model": "model.name", "tokenizer": "model.name", "revision": "model.revision",
        "dtype": "engine.dtype", "max_model_len": "engine.max_model_len", "max_num_seqs": "engine.max_num_seqs",
        "enforce_eager": "engine.enforce_eager", "tensor_parallel_size": "engine.tensor_parallel_size",
        "kv_cache_memory_bytes": "engine.kv_cache_gib", "seed": "sampling.seed",
        "data_parallel_size": "workers.count",
    }

    @field_validator("vllm")
    @classmethod
    def _vllm_engine_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        known = cls.vllm_arg_names() if args else None
        for key in args:
            if key in cls.OWN_FIELDS:
                problem, fix = "genfarm sets this vLLM argument", f"set {cls.OWN_FIELDS[key]} instead"
            elif known is not None and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                problem = "not a vLLM engine argument"
                fix = f"did you mean '{close[0]}'?" if close else "see vllm.engine.arg_utils.EngineArgs for the names"
            else:
                continue
            error = ValueError(f"{problem}. Fix: {fix}")  # raised with the key in its location: engine.vllm.KEY
            raise ValidationError.from_exception_data(
                cls.__name__, [InitErrorDetails(type="value_error", loc=(key,), input=args[key], ctx={"error": error})]
            )
        return args

    @staticmethod
    @cache
    def vllm_arg_names() -> tuple[str, ...] | None:
        """The field names of vLLM's EngineArgs dataclass, read from its source (parsing one file instead of
        importing vLLM, which takes seconds). None when vLLM is not installed here: the keys are then checked where
        the engine starts."""
        found = importlib.util.find_spec("vllm")
        if found is None:
            return None
        source = Path(found.submodule_search_locations[0]) / "engine" / "arg_utils.py"
        try:
            tree = ast.parse(source.read_text())
        except (OSError, SyntaxError):  # no source shipped: import the dataclass after all
            from vllm.engine.arg_utils import EngineArgs

            return tuple(field.name for field in dataclasses.fields(EngineArgs))
        body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "EngineArgs")
        return tuple(item.target.id for item in body
                     if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                     and not ast.unparse(item.annotation).startswith(("ClassVar", "InitVar")))


class SamplingSpec(Spec):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    n: int = Field(1, ge=1, description="Samples per prompt.")
    seed: int | None = Field(0, description="Base seed; each row's seed derives from it and the row id.")
    stop: list[str] = Field(default_factory=list)


class ScaleRange(Spec):
    """A fixed count, or a min/max range to autoscale within (engine actors of a job, replicas of a service)."""

    section: ClassVar[str] = "scale"  # the name errors use
    count: int | None = Field(None, ge=1, description="Fixed number (default 1).")
    min: int | None = Field(None, ge=1, description="With max: an autoscaling range.")
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _count_or_range(self) -> ScaleRange:
        section = type(self).section
        if self.count is not None and (self.min is not None or self.max is not None):
            raise ValueError(f"give {section}.count or {section}.min/max, not both")
        if (self.min is None) != (self.max is None):
            raise ValueError(f"{section}.min and {section}.max go together")
        if self.min is not None and self.min > self.max:
            raise ValueError(f"{section}.min ({self.min}) is larger than {section}.max ({self.max})")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        if self.min is not None:
            return self.min, self.max
        return self.count or 1, self.count or 1


class WorkersSpec(ScaleRange):
    section: ClassVar[str] = "workers"
    batch_size: int = Field(64, ge=1, description="Rows handed to an engine at once.")
    max_retries: int = Field(2, ge=0, description="Tries again for a batch whose engine actor died.")
    batches_in_flight: int = Field(
        3, ge=1, description="Batches an engine works on at once, so it never idles while one batch finishes."
    )
    prefix_window: int = Field(
        4096, ge=0, description="Rows a reader takes at a time and orders by prompt, so rows that share a prompt "
        "prefix (a document with many questions, a long system prompt) reach one engine together and its prefix "
        "cache computes the prefix once; 0 keeps the input's order.")


class QualitySpec(Spec):
    """The job file's `quality:` section (genfarm/quality.py runs the checks); a check left out takes the task's
    default, false turns it off."""

    retries: int = Field(0, ge=0, le=10, description="Regenerate a row that fails a check up to this many times.")
    repetition_penalty: float | None = Field(
        None, gt=0, description="vLLM's repetition_penalty for regenerations (e.g. 1.2 against loops).")
    on_failure: Literal["flag", "error"] = Field(
        "flag", description="flag: keep the best attempt and list its failed checks in `quality`; error: a "
        "`quality` error row instead.")
    truncated: Literal["off", "flag", "trim", "regenerate"] | None = Field(
        None, description="A text cut at max_tokens: flag it, trim it to its last complete sentence, or regenerate "
        "with more room (then trim, for tasks whose text can be trimmed).")
    empty: bool | None = Field(None, description="Flag a text with no words.")
    repetition: float | Literal[False] | None = Field(
        None, description="Most repetition allowed: the share of repeated word 3-grams, 0-1 (loops score near 1).")
    min_words: int | Literal[False] | None = Field(None, description="Fewest words a text may have.")
    max_words: int | Literal[False] | None = Field(None, description="Most words a text may have.")
    language: bool | None = Field(None, description="The text must be in the language the task asks for "
                                  "(translations: the target), by language identification (py3langid).")
    length_ratio: tuple[float, float] | Literal[False] | None = Field(
        None, description="Words of the text over words of its source (translations): the range allowed.")

    @field_validator("repetition")
    @classmethod
    def _share(cls, value):
        if value is not False and value is not None and not 0 < value <= 1:
            raise ValueError(f"{value} is not a share. Fix: give a number between 0 and 1, e.g. 0.5, or false")
        return value

    @field_validator("min_words", "max_words")
    @classmethod
    def _words(cls, value, info: ValidationInfo):
        if value is False or value is None:
            return value
        if value < 0:
            raise ValueError(f"{value} is not a number of words. Fix: give 0 or more, or false")
        least = info.data.get("min_words")  # validated first: the field before
        if info.field_name == "max_words" and least not in (None, False) and value < least:
            raise ValueError(f"{value} is fewer than min_words ({least}), so every text would fail. Fix: give "
                             "max_words >= min_words")
        return value

    @field_validator("length_ratio")
    @classmethod
    def _ratio(cls, value):
        if value not in (None, False) and not 0 <= value[0] <= value[1]:
            raise ValueError(f"[{value[0]:g}, {value[1]:g}] is not a range. Fix: give [low, high] with 0 <= low <= "
                             "high, e.g. [0.5, 2]")
        return value


class OutputSpec(Spec):
    path: str = Field(description="Output folder (local path or URI); results are OUTPUT/*.parquet.")
    storage_options: StorageOptions = Field(default_factory=dict, description="For a URI: as input.storage_options.")
    compact: bool = Field(True, description="When the job ends, merge each input file's parts (one per batch) into "
                          "parts of up to 128 MiB; false keeps one part per batch.")

    @model_validator(mode="after")
    def _located(self) -> OutputSpec:
        object.__setattr__(self, "path", Location(self.path, self.storage_options))  # opened with its options
        return self


class JobSpec(Spec):
    plugins: list[str] = Field(default_factory=list, description="Python modules that add task types (importable "
                               "on every node); imported before `task` is read.")
    name: str | None = None
    input: InputSpec
    task: TaskSection
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    sampling: SamplingSpec = SamplingSpec()
    workers: WorkersSpec = WorkersSpec()
    quality: QualitySpec = QualitySpec()
    output: OutputSpec

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, modules: list[str]) -> list[str]:
        return load_plugins(modules)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML so numbers and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text}", "expected KEY=VALUE", "write it like --set sampling.max_tokens=256")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return data


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read and validate a job file; every problem is a one-line UserError naming the field."""
    return load_spec(JobSpec, path, overrides, "job file", example="jobs/articles.yaml")


def load_spec(model: type[Spec], path: str | Path, overrides: list[str], what: str, example: str) -> Any:
    """Read a YAML file into `model`, with --set overrides applied first."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), f"{what} not found", f"check the path, e.g. {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(where, f"not valid YAML ({getattr(err, 'problem', err)})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"a {what} is a YAML mapping", f"see {example} for the layout")
    return validate(model, apply_overrides(data, list(overrides)), source=str(path))


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise describe_validation_error(model, err, source, data) from None


def describe_validation_error(model: type[BaseModel], err: ValidationError, source: str, data: Any = None) -> UserError:
    """Turn pydantic's first complaint into a one-line error with the dotted field name and a fix."""
    first = err.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    field = ".".join(loc) or "(top level)"
    kind, message = first["type"], first["msg"]
    where = f"{source}: {field}"
    if kind == "extra_forbidden":
        known = _field_names(model, loc[:-1], data)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"remove it; valid fields here: {', '.join(known)}"
        return UserError(where, "unknown field", fix)
    if kind == "missing":
        return UserError(where, "required field is missing", f"add {field} to the job file or pass --set {field}=...")
    if kind == "value_error":  # a validator's message may carry its own fix after ". Fix: "
        problem, _, fix = message.removeprefix("Value error, ").partition(". Fix: ")
        return UserError(where if loc else source, problem, fix or "see the README's job-file table")
    got = first.get("input")
    return UserError(where, f"{message} (got {got!r})", f"set {field} to a valid value")


def _field_names(model: type[BaseModel], loc: list[str], data: Any) -> list[str]:
    """The fields valid at a dotted location, for 'did you mean' hints; a task section's fields are those of the
    task its `type` (or, in a serve config, its name) names."""
    current: Any = model
    for part in loc:
        data = data.get(part) if isinstance(data, dict) else None
        if current is TaskConfig:  # a mapping of task name -> task config (the serve config's tasks)
            current = TASK_CONFIGS.get(part)
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is TaskConfig and isinstance(data, dict) and "type" in data:
            current = TASK_CONFIGS.get(data["type"])
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (itself, or inside Annotated, Optional, dict[str, ...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(get_args(annotation)):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
