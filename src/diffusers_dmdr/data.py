"""Prompt datasets through `datasets`, and a deterministic, resumable prompt sampler."""

from pathlib import Path

import numpy as np

from .hub_cache import hub_cache_kwargs


LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompts(
    source: str,
    prompt_column: str | None = None,
    split: str = "train",
    config_name: str | None = None,
    max_samples: int | None = None,
) -> list[str]:
    """Load prompts from a local .txt (one per line), .json/.jsonl/.csv/.parquet file, or a Hub dataset id.

    Blank prompts are dropped. Raises `FileNotFoundError` / `ValueError` naming the fix for a missing file, an unknown
    format, a missing column or an empty prompt set.
    """
    import datasets

    path = Path(source)
    looks_local = path.suffix.lower() in LOCAL_FORMATS or path.exists() or source.startswith((".", "/"))
    if looks_local:
        if path.is_dir():
            raise ValueError(
                f"--train_prompts {source} is a folder; give a prompt file inside it (one of {sorted(LOCAL_FORMATS)})."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"--train_prompts {source} does not exist; give a prompt file or a Hub dataset id."
            )
        check_text_file(path)
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"--train_prompts {source}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}."
            )
        column = prompt_column or ("text" if builder == "text" else "prompt")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types for unreadable files
            raise ValueError(f"--train_prompts {source} could not be read as {builder}: {error}") from error
    else:
        column = prompt_column or "prompt"
        try:
            dataset = datasets.load_dataset(source, config_name, split=split, **hub_cache_kwargs())
        except Exception as error:
            raise ValueError(
                f"--train_prompts {source} is neither a local file nor a loadable Hub dataset ({error}). "
                "Check the id, your network/HF_HUB_OFFLINE setting, or pass a local prompt file."
            ) from error
    if column not in dataset.column_names:
        raise ValueError(
            f"--train_prompts {source} has no column {column!r}; its columns are {dataset.column_names}. "
            "Pass --prompt_column."
        )
    prompts = [str(p).strip() for p in dataset[column] if p is not None and str(p).strip()]
    if max_samples is not None:
        prompts = prompts[:max_samples]
    if not prompts:
        raise ValueError(f"--train_prompts {source} contains no non-empty prompts in column {column!r}.")
    return prompts


def check_text_file(path: Path) -> None:
    """Refuse an empty, binary or non-UTF-8 text prompt file (`.txt`/`.json`/`.jsonl`/`.csv`) with the fix, before
    `datasets` turns it into a vague "error while generating the dataset"."""
    if path.suffix.lower() == ".parquet":
        return
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(
            f"--train_prompts {path} contains no non-empty prompts (the file is empty); write one per line."
        )
    if b"\x00" in data:
        raise ValueError(f"--train_prompts {path} is a binary file, not text; give a UTF-8 text prompt file.")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"--train_prompts {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); re-save it as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


class PromptSampler:
    """Batches of prompts as a pure function of the iteration counter.

    Each epoch is a seeded permutation of the prompts; process `p` of `P` takes its own slice of every global batch,
    so data parallel processes see disjoint prompts and a resumed run continues with exactly the prompts it would have
    seen.

    With `stage2_batch_size`, iterations from `stage2_start_iteration` on draw that many prompts per process: the
    stream of prompts continues where stage 1 left it, at position
    `P (b_1 min(i, i_2) + b_2 max(i - i_2, 0))` for iteration `i`, `P` processes and batch sizes `b_1`, `b_2`.
    """

    def __init__(
        self,
        prompts: list[str],
        batch_size: int,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
        stage2_batch_size: int | None = None,
        stage2_start_iteration: int = 0,
    ):
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.stage2_batch_size = batch_size if stage2_batch_size is None else stage2_batch_size
        self.stage2_start_iteration = stage2_start_iteration
        self._permutation_cache: tuple[int, np.ndarray] | None = None

    def batch_size_at(self, iteration: int) -> int:
        """Prompts per process at `iteration`."""
        return self.batch_size if iteration < self.stage2_start_iteration else self.stage2_batch_size

    def batch(self, iteration: int) -> list[str]:
        boundary = self.stage2_start_iteration
        consumed_per_process = self.batch_size * min(iteration, boundary) + self.stage2_batch_size * max(
            iteration - boundary, 0
        )
        batch_size = self.batch_size_at(iteration)
        start = consumed_per_process * self.num_processes + self.process_index * batch_size
        return [self._prompt_at(position) for position in range(start, start + batch_size)]

    def _prompt_at(self, position: int) -> str:
        epoch, offset = divmod(position, len(self.prompts))
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            self._permutation_cache = (epoch, permutation)
        return self.prompts[self._permutation_cache[1][offset]]
