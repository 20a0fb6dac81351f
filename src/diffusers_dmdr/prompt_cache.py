"""Prompt encoding for training: live on the device, live with the text encoders offloaded, or from a cache.

Big text encoders (T5-XXL is ~9.5 GB in bf16) need not sit on the GPU for the whole run: with `cache_prompt_embeds`
the whole prompt set, the family's negative prompt (empty for most) and the validation prompts are encoded once, kept on the host and written to
`<cache_dir>/<key>.safetensors`, where the key covers the teacher (id or folder, revision, variant, the text encoders'
files), the family, the resolution, the dtype and the prompts. The next run with the same key reads the file and never
moves the text encoders to the device.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .families.base import TEXT_ENCODER_NAMES


DEFAULT_CACHE_DIR = Path("~/.cache/diffusers_dmdr/prompt_embeds")
# Bump when the cached content changes meaning, so old files are never read.
CACHE_FORMAT_VERSION = 1
ENCODE_BATCH_SIZE = 32
_SEPARATOR = "/"


def flatten_condition(condition: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """`{"a": x, "b": {"c": y}}` -> `{"a": x, "b/c": y}` (safetensors stores flat names)."""
    flat = {}
    for key, value in condition.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_condition(value, name + _SEPARATOR))
        else:
            flat[name] = value
    return flat


def unflatten_condition(flat: dict[str, torch.Tensor]) -> dict:
    condition: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(_SEPARATOR)
        node = condition
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return condition


def _encoder_fingerprint(source: str, subfolders: list[str]) -> list:
    """Names, sizes and modification times of a local teacher's text-encoder files (a Hub id is keyed by its id and
    revision instead)."""
    root = Path(source).expanduser()
    if not root.is_dir():
        return []
    entries = []
    for subfolder in subfolders:
        for file in sorted((root / subfolder).glob("*")):
            if file.is_file():
                stat = file.stat()
                entries.append([f"{subfolder}/{file.name}", stat.st_size, stat.st_mtime_ns])
    return entries


def cache_key(
    source: str,
    revision: str | None,
    variant: str | None,
    family: str,
    resolution: int,
    dtype: torch.dtype,
    prompts: list[str],
    encoder_subfolders: list[str],
) -> str:
    """A hex digest naming one prompt-embedding cache file."""
    local = Path(source).expanduser()
    description = {
        "version": CACHE_FORMAT_VERSION,
        "teacher": str(local.resolve()) if local.is_dir() else source,
        "revision": revision,
        "variant": variant,
        "encoders": _encoder_fingerprint(source, encoder_subfolders),
        "family": family,
        "resolution": resolution,
        "dtype": str(dtype),
        "prompts": hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def _text_encoder_names(pipeline) -> list[str]:
    return [name for name in TEXT_ENCODER_NAMES if getattr(pipeline, name, None)]


class PromptEncoder:
    """Turns prompts into the backbone's conditioning, in one of three ways (see the module docstring).

    Args:
        family: the teacher's model family (its `encode_prompts` is the stock pipeline's `encode_prompt`).
        pipeline: the teacher pipeline holding the tokenizers and text encoders.
        resolution (`int` or `tuple[int, int]`): the training resolution, or `(height, width)` when not square (SDXL
            micro-conditioning depends on it).
        device: where the conditioning is needed.
        offload (`bool`): keep the encoders on the CPU and move them to `device` only while encoding.
        cache (`dict[str, torch.Tensor]`, *optional*): flat cached conditioning, one row per prompt of `cached_prompts`.
    """

    def __init__(
        self, family, pipeline, resolution: int, device, offload: bool = False, cache=None, cached_prompts=()
    ):
        self.family = family
        self.pipeline = pipeline
        self.resolution = resolution
        self.device = torch.device(device)
        self.offload = offload or cache is not None
        self.encoders = family.text_encoders(pipeline)
        for encoder in self.encoders:
            encoder.requires_grad_(False).eval()
        if not self.offload:
            for encoder in self.encoders:
                encoder.to(self.device)
        self.cache = cache
        self.rows = {prompt: row for row, prompt in enumerate(cached_prompts)}
        self.live_encodes = 0

    @classmethod
    def from_config(cls, config, teacher, accelerator, prompts: list[str]) -> "PromptEncoder":
        """The encoder a run's config asks for; builds or reads the cache (the main process writes it)."""
        device = accelerator.device
        # An int when square, so that the caches of square runs keep their keys.
        size = config.conditioning_size
        if not config.cache_prompt_embeds:
            return cls(teacher.family, teacher.pipeline, size, device, offload=config.offload_text_encoders)
        negative = teacher.family.negative_prompt
        wanted = list(dict.fromkeys([negative, *prompts, *(config.validation_prompts or [])]))
        encoder_dtype = next(teacher.family.text_encoders(teacher.pipeline)[0].parameters()).dtype
        key = cache_key(
            teacher.source,
            config.revision,
            config.variant,
            teacher.family.name,
            size,
            encoder_dtype,
            wanted,
            _text_encoder_names(teacher.pipeline),
        )
        cache_dir = Path(config.prompt_embeds_cache_dir or DEFAULT_CACHE_DIR).expanduser()
        path = cache_dir / f"{key}.safetensors"
        if accelerator.is_main_process and not path.is_file():
            live = cls(teacher.family, teacher.pipeline, size, device, offload=True)
            write_cache(path, wanted, live.encode_all(wanted))
        accelerator.wait_for_everyone()
        cached_prompts, cache = read_cache(path)
        return cls(teacher.family, teacher.pipeline, size, device, cache=cache, cached_prompts=cached_prompts)

    def _encode_live(self, prompts: list[str]) -> dict:
        self.live_encodes += 1
        if not self.offload or self.device.type == "cpu":
            return self.family.encode_prompts(self.pipeline, prompts, self.resolution, self.device)
        from diffusers.training_utils import offload_models

        with offload_models(*self.encoders, device=self.device, offload=True):
            return self.family.encode_prompts(self.pipeline, prompts, self.resolution, self.device)

    def encode_all(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Flat conditioning of every prompt on the host, encoded in batches (with a progress bar)."""
        chunks = []
        for start in tqdm(range(0, len(prompts), ENCODE_BATCH_SIZE), desc="Encoding prompts for the cache"):
            condition = self._encode_live(prompts[start : start + ENCODE_BATCH_SIZE])
            chunks.append({k: v.detach().cpu() for k, v in flatten_condition(condition).items()})
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}

    def encode(self, prompts: list[str]) -> dict:
        """Conditioning of `prompts` on the device: rows of the cache, or live for prompts it does not hold."""
        if self.cache is None or any(prompt not in self.rows for prompt in prompts):
            return self._encode_live(prompts)
        rows = torch.tensor([self.rows[prompt] for prompt in prompts])
        return unflatten_condition({name: value[rows].to(self.device) for name, value in self.cache.items()})


def write_cache(path: Path, prompts: list[str], flat: dict[str, torch.Tensor]) -> None:
    """Write atomically (a temporary file renamed into place): a crash never leaves a half cache to be read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in flat.items()}, temporary, metadata={"prompts": json.dumps(prompts)})
    os.replace(temporary, path)


def read_cache(path: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])
    return prompts, load_file(path)
