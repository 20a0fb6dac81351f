"""The Hugging Face cache folder of a run (`--cache_dir`), for every Hub read the run makes.

A run reads from the Hub in many places: the preflight's config files (teacher, VAE, scheduler, reward autoencoder),
the teacher's and the VAE's weights, the rewards' models and tokenizers, and the export's reloads. Each of them passes
`**hub_cache_kwargs()` to its `from_pretrained` / `hf_hub_download`, so the one `--cache_dir` reaches them all
without threading it through every signature (the families, memory plans and reward classes stay unchanged).
`using_hub_cache_dir(config.cache_dir)` sets it for a block: the training command line, the export and the preflight
open one.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


_CACHE_DIR: ContextVar[str | None] = ContextVar("diffusers_dmdr_hub_cache_dir", default=None)


def hub_cache_dir() -> str | None:
    """The cache folder set by the innermost [`using_hub_cache_dir`], or `None` (the Hugging Face default cache)."""
    return _CACHE_DIR.get()


def hub_cache_kwargs() -> dict:
    """`{"cache_dir": folder}` while a cache folder is set, else `{}` (so the libraries' own default applies)."""
    folder = _CACHE_DIR.get()
    return {"cache_dir": folder} if folder else {}


@contextmanager
def using_hub_cache_dir(cache_dir: str | None) -> Iterator[None]:
    """Within the block, every Hub read of the project uses `cache_dir` (`None`: the default cache)."""
    token = _CACHE_DIR.set(str(Path(cache_dir).expanduser()) if cache_dir else None)
    try:
        yield
    finally:
        _CACHE_DIR.reset(token)
