"""Small I/O helpers shared by the trainer, the export and the demo."""

import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image


# The package's one table of dtype names (`--mixed_precision`, evaluate's `--dtype`, a reward's `precision=`); torch's
# long names and accelerate's `no` (full precision) are aliases.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"no": "fp32", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def resolve_dtype(name: str) -> torch.dtype:
    """`"bf16"` (or `"bfloat16"`) -> `torch.bfloat16`; `ValueError` naming the choices for anything else."""
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(DTYPES)} (or {sorted(DTYPE_ALIASES)}).")
    return DTYPES[key]


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`(B, 3, H, W)` images in `[0, 1]` to PIL images."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in array]


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """Tile `(B, 3, H, W)` images in `[0, 1]` into a `rows x ceil(B / rows)` grid."""
    pil_images = images_to_pil(images)
    columns = -(-len(pil_images) // rows)
    width, height = pil_images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), color=(255, 255, 255))
    for index, image in enumerate(pil_images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, rows: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows).save(path)
    return path


# An absolute or home-relative local path: `/` or `~/` not preceded by a word, `.`, `:` or `/` (so Hub ids `org/name`
# and URLs `https://host/...` are left alone), up to whitespace, a quote, `:`, `|` or `,`.
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`:|,()\[\]]+")


def redact_local_paths(text: str) -> str:
    """Replace every local absolute path in `text` by `<local>/<its last component>` (for what is published)."""
    return _LOCAL_PATH.sub(lambda match: f"<local>/{Path(match[0].rstrip('/')).name}", text)


def redact_local_paths_in(value):
    """`redact_local_paths` on every string of a nested dict / list value."""
    if isinstance(value, str):
        return redact_local_paths(value)
    if isinstance(value, dict):
        return {key: redact_local_paths_in(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_local_paths_in(item) for item in value]
    return value


class OnceFilter(logging.Filter):
    """Lets the first record whose message starts with `prefix` through, shortened to `max_chars`; drops the rest.

    diffusers' pipelines log "The following part of your input was truncated ..." with the whole cut-off text on
    every call: a 100k-character prompt then fills the log at every training step."""

    def __init__(self, prefix: str, max_chars: int = 300):
        super().__init__()
        self.prefix, self.max_chars, self.seen = prefix, max_chars, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        if len(message) > self.max_chars:
            record.msg, record.args = message[: self.max_chars] + " ... (shown once; later truncations not logged)", ()
        return True


TRUNCATION_WARNING = "The following part of your input was truncated"


def log_prompt_truncation_once(logger_name: str) -> None:
    """Install a `OnceFilter` for diffusers' prompt-truncation warning on the logger `logger_name` (idempotent)."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, OnceFilter) and f.prefix == TRUNCATION_WARNING for f in target.filters):
        target.addFilter(OnceFilter(TRUNCATION_WARNING))
