"""Checkpoint folders of a DMDR run: file names, atomic writes, listing, rotation, `latest`, pickle-free state.

A checkpoint is written into a hidden sibling folder `.checkpoint-N.tmp`; once every file is there, a completeness
marker (`checkpoint_complete.json`, listing each file and its size) is written last and the folder is renamed to
`checkpoint-N`. Only then are old checkpoints pruned. A crash at any point therefore leaves the previous complete
checkpoint untouched, and `latest` resolves to the newest folder whose marker matches its files.
"""

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER, adapter_state_dict, load_adapter_state_dict


logger = logging.getLogger(__name__)

STUDENT_LORA_FILE = "student_lora.safetensors"
STUDENT_FULL_FILE = "student.safetensors"
FAKE_LORA_FILE = "fake_lora.safetensors"
CONFIG_FILE = "dmdr_config.yaml"
# The trainer's counters and per-step history, as JSON (never a pickle).
TRAINER_STATE_FILE = "trainer_state.json"
# Written last: a folder without it (or whose files do not match it) is incomplete and never resumed.
COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY_NAME = re.compile(r"^\.checkpoint-(\d+)\.tmp$")
# Files accelerate unpickles with `weights_only=False` (objects given to `register_for_checkpointing`).
_PICKLED_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed; the message names the folder or file and the fix."""


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def temporary_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The hidden sibling folder a checkpoint is written into before its rename."""
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def list_checkpoints(output_dir: str | Path, complete_only: bool = False) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, oldest first (only the complete ones with `complete_only`)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    if complete_only:
        folders = [p for p in folders if is_complete_checkpoint(p)]
    return sorted(folders, key=_checkpoint_step)


def write_complete_marker(folder: str | Path, step: int) -> None:
    """List every file of `folder` with its size in the marker; written last, flushed to disk."""
    folder = Path(folder)
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }
    marker = folder / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def incomplete_reason(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint (`None` when it is)."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the save was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {COMPLETE_MARKER} ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def is_complete_checkpoint(folder: str | Path) -> bool:
    return incomplete_reason(folder) is None


def atomic_checkpoint_save(
    output_dir: str | Path,
    step: int,
    write_files: Callable[[Path], None],
    finalize_files: Callable[[Path], None] | None = None,
    limit: int | None = None,
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Path:
    r"""Write `output_dir/checkpoint-{step}` atomically, then prune to `limit` complete checkpoints.

    1. the main process clears a stale `.checkpoint-{step}.tmp`; 2. every process calls `write_files(tmp)` (under
    FSDP each rank writes its shard into the same folder); 3. the main process calls
    `finalize_files(tmp)` (config, counters), writes the completeness marker, renames the folder to
    `checkpoint-{step}` and only then deletes the oldest complete checkpoints and leftover temporary folders.

    Raises:
        `CheckpointError`: the disk is full ("no space left on <dir>") or another OS error; the partial folder is
        removed and every earlier checkpoint kept.
    """
    output_dir = Path(output_dir)
    tmp = temporary_checkpoint_dir(output_dir, step)
    final = output_dir / f"checkpoint-{step}"
    try:
        if is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        wait_for_everyone()
        write_files(tmp)
        wait_for_everyone()
        if is_main_process:
            if finalize_files is not None:
                finalize_files(tmp)
            write_complete_marker(tmp, step)
            if final.exists():
                # Re-saving a step (e.g. after a resume at that step): the new folder replaces the old one.
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as error:
        if is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise CheckpointError(
                f"No space left on {output_dir} while writing checkpoint-{step}: the partial folder was removed and "
                f"the previous checkpoints are kept. Free disk space or lower --checkpoints_total_limit, then "
                "resume with --resume_from_checkpoint latest."
            ) from error
        raise CheckpointError(
            f"Could not write checkpoint-{step} in {output_dir} ({error}); the partial folder was removed and the "
            "previous checkpoints are kept."
        ) from error
    except BaseException:
        # An interrupt (Ctrl-C) or a failing writer: leave no partial folder that looks like a checkpoint.
        if is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main_process:
        prune_checkpoints(output_dir, limit, keep=final)
    wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest `limit` complete checkpoints (never `keep`, the one just written); remove the rest, incomplete
    `checkpoint-N` folders older than `keep` and leftover `.checkpoint-N.tmp` folders of interrupted saves."""
    output_dir = Path(output_dir)
    for leftover in output_dir.iterdir() if output_dir.is_dir() else []:
        if leftover.is_dir() and _TEMPORARY_NAME.match(leftover.name):
            logger.info(f"Removing the partial checkpoint {leftover} of an interrupted save")
            shutil.rmtree(leftover, ignore_errors=True)
    if keep is not None:
        for folder in list_checkpoints(output_dir):
            if (
                folder != keep
                and _checkpoint_step(folder) < _checkpoint_step(keep)
                and not is_complete_checkpoint(folder)
            ):
                logger.info(f"Removing incomplete checkpoint {folder} ({incomplete_reason(folder)})")
                shutil.rmtree(folder, ignore_errors=True)
    if not limit:
        return
    complete = [p for p in list_checkpoints(output_dir, complete_only=True) if p != keep]
    stale = complete[: max(len(complete) - (limit - (keep is not None)), 0)]
    for folder in stale:
        logger.info(f"Removing old checkpoint {folder}")
        shutil.rmtree(folder)


def resolve_checkpoint(output_dir: str | Path, checkpoint: str) -> Path | None:
    """`latest` -> the newest complete `checkpoint-N` of `output_dir` (or None), logging each incomplete one it
    skips; otherwise the given folder, which must exist and be complete."""
    if checkpoint == "latest":
        for folder in reversed(list_checkpoints(output_dir)):
            reason = incomplete_reason(folder)
            if reason is None:
                return folder
            logger.warning(f"Skipping incomplete checkpoint {folder}: {reason}.")
        return None
    path = Path(checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint: {reason}. Resume from an earlier one, or "
            "pass --resume_from_checkpoint latest to take the newest complete one."
        )
    return path


def refuse_pickled_state(folder: str | Path) -> None:
    """A checkpoint never holds pickles the loader would run: refuse `custom_checkpoint_*.pkl` before any load."""
    pickles = sorted(p.name for p in Path(folder).iterdir() if _PICKLED_STATE.match(p.name))
    if pickles:
        raise CheckpointError(
            f"{Path(folder) / pickles[0]}: checkpoints of diffusers-dmdr hold no pickled objects (loading one could run "
            f"arbitrary code). Delete {', '.join(pickles)} if you wrote it yourself, or resume from a checkpoint "
            "written by this version."
        )


def save_trainer_state(folder: str | Path, counters: dict, history: list[dict]) -> None:
    """The trainer's integer counters and per-step logs as JSON (`TRAINER_STATE_FILE`)."""
    payload = {"counters": {key: int(value) for key, value in counters.items()}, "history": history}
    (Path(folder) / TRAINER_STATE_FILE).write_text(json.dumps(payload, indent=1, allow_nan=True), encoding="utf-8")


def load_trainer_state(folder: str | Path) -> tuple[dict, list[dict]]:
    """Read back `save_trainer_state`'s counters and history; the error names the file."""
    path = Path(folder) / TRAINER_STATE_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        counters = {key: int(value) for key, value in payload["counters"].items()}
        history = list(payload.get("history", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is missing or corrupt ({error}); resume from another checkpoint.") from error
    return counters, history


def objective_state_file(folder: str | Path, process_index: int) -> Path:
    return Path(folder) / f"objective_state_{process_index}.safetensors"


def save_objective_state(folder: str | Path, process_index: int, state: dict[str, torch.Tensor]) -> None:
    """The objective's tensors (e.g. GRPO's frozen reference) as this process holds them; nothing when empty."""
    if state:
        save_file(
            {key: value.detach().contiguous().cpu() for key, value in state.items()},
            objective_state_file(folder, process_index),
        )


def load_objective_state(folder: str | Path, process_index: int) -> dict[str, torch.Tensor]:
    """Read back `save_objective_state`'s tensors (empty when the objective saved none)."""
    path = objective_state_file(folder, process_index)
    if not path.is_file():
        return {}
    return load_file(path)


def load_accelerator_state_safely(accelerator, folder: str | Path) -> None:
    """`accelerator.load_state(folder)` with every `torch.load` in `weights_only=True` mode and no custom objects.

    accelerate 1.15 loads optimizer, scheduler and RNG states through `accelerate.utils.load`, which forwards
    `load_kwargs` to `torch.load`; only registered custom objects are unpickled with `weights_only=False`. The
    trainer registers none, and `refuse_pickled_state` rejects a planted one before accelerate sees it.
    """
    refuse_pickled_state(folder)
    if getattr(accelerator, "_custom_objects", None):
        raise CheckpointError("Objects registered with accelerator.register_for_checkpointing would be unpickled.")
    try:
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"Checkpoint {folder} could not be loaded ({type(error).__name__}: {error}). A file in it is corrupt or "
            "was written by an incompatible run; resume from an earlier checkpoint."
        ) from error


def load_weights_file(path: str | Path) -> dict:
    """`safetensors.torch.load_file(path)`, with an error that names the file when it is missing or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise CheckpointError(
            f"{path} is missing or corrupt ({type(error).__name__}: {error}); resume from an earlier checkpoint."
        ) from error


def register_weight_hooks(accelerator, module, sharded: bool, student_state_dict: Callable[[], dict]) -> None:
    """Have `accelerator.save_state` / `load_state` write and read the training module's trainable weights as
    safetensors (the student's LoRA or full backbone, the fake-score LoRA), never as a pickle.

    FSDP (`sharded`) keeps its own sharded format: the hooks leave them alone. Unsharded runs write
    from the main process; `student_state_dict()` gives the student's weights in the export's format.
    """

    def check(model) -> None:
        if accelerator.unwrap_model(model) is not module:
            raise ValueError(f"Unexpected model {type(model).__name__} in the checkpoint.")

    def save_hook(models, weights, output_dir) -> None:
        if sharded or not accelerator.is_main_process:
            return
        for model in models:
            check(model)
            student_file = STUDENT_FULL_FILE if module.is_full else STUDENT_LORA_FILE
            save_file(student_state_dict(), Path(output_dir) / student_file)
            save_file(adapter_state_dict(module.backbone, FAKE_ADAPTER), Path(output_dir) / FAKE_LORA_FILE)
        # Every model was written above: accelerate must not save it a second time.
        weights.clear()

    def load_hook(models, input_dir) -> None:
        if sharded:
            return
        while models:
            check(models.pop())
            if module.is_full:
                module.student_backbone.load_state_dict(
                    load_weights_file(Path(input_dir) / STUDENT_FULL_FILE), strict=True
                )
            else:
                student_weights = load_weights_file(Path(input_dir) / STUDENT_LORA_FILE)
                load_adapter_state_dict(module.backbone, STUDENT_ADAPTER, student_weights)
            load_adapter_state_dict(module.backbone, FAKE_ADAPTER, load_weights_file(Path(input_dir) / FAKE_LORA_FILE))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
