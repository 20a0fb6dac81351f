"""Checkpoint folders of a DMDR run: file names, listing, rotation, `latest`."""

import logging
import shutil
from pathlib import Path


logger = logging.getLogger(__name__)

STUDENT_LORA_FILE = "student_lora.safetensors"
STUDENT_FULL_FILE = "student.safetensors"
FAKE_LORA_FILE = "fake_lora.safetensors"
CONFIG_FILE = "dmdr_config.yaml"


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete the oldest checkpoints so that, with the one about to be written, at most `limit` remain."""
    if not limit:
        return
    checkpoints = sorted(list_checkpoints(output_dir), key=_checkpoint_step)
    for stale in checkpoints[: max(len(checkpoints) - limit + 1, 0)]:
        logger.info(f"Removing old checkpoint {stale}")
        shutil.rmtree(stale)


def resolve_checkpoint(output_dir: str | Path, checkpoint: str) -> Path | None:
    """`latest` -> the highest `checkpoint-N` in `output_dir` (or None); otherwise the given folder, which must exist."""
    if checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return max(checkpoints, key=_checkpoint_step) if checkpoints else None
    path = Path(checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    return path
