"""Checkpoint folders of a DMDR run: file names, atomic writes, listing, rotation, `latest`, pickle-free state.

A checkpoint is written into a hidden sibling folder `.checkpoint-N.tmp`; once every file is there, a completeness
marker (`checkpoint_complete.json`, listing each file with its size and sha256) is written last and the folder is
renamed to `checkpoint-N`. A crash at any point therefore leaves the previous complete checkpoint untouched, and
`latest` resolves to the newest folder whose marker matches its files (sizes and content hashes: a flipped block of
the same size is caught) and, for a resume, whose weights parse and are finite. With `--checkpoints_total_limit N >= 2`
the oldest checkpoints beyond `N - 1` are pruned *before* the write (so a full disk has the room the limit promises),
the rest after it; the newest complete checkpoint is never removed before its successor is complete.
"""

import errno
import hashlib
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
        # Sizes only: pruning lists checkpoints at every save, and hashing each of them there would cost a full read.
        folders = [p for p in folders if is_complete_checkpoint(p, verify_hashes=False)]
    return sorted(folders, key=_checkpoint_step)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_complete_marker(folder: str | Path, step: int) -> None:
    """List every file of `folder` with its size and sha256 in the marker; written last, flushed to disk."""
    folder = Path(folder)
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER]
    files = {str(path.relative_to(folder)): path.stat().st_size for path in paths}
    hashes = {str(path.relative_to(folder)): file_sha256(path) for path in paths}
    marker = folder / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files, "sha256": hashes}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def incomplete_reason(folder: str | Path, verify_hashes: bool = True) -> str | None:
    """Why `folder` is not a complete checkpoint (`None` when it is): no or unreadable marker, a listed file missing,
    of another size or (with `verify_hashes`, markers that carry hashes) of other content."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the save was interrupted)"
    try:
        listing = json.loads(marker.read_text(encoding="utf-8"))
        files, hashes = dict(listing["files"]), dict(listing.get("sha256", {}))
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {COMPLETE_MARKER} ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    if verify_hashes:
        for name, expected in hashes.items():
            if name in files and file_sha256(folder / name) != expected:
                return f"{name} does not match its sha256 in {COMPLETE_MARKER} (the file is corrupt)"
    return None


def unhealthy_weights_reason(folder: str | Path) -> str | None:
    """Why the safetensors weights of a complete checkpoint cannot be resumed (`None` when they can): a header that
    does not parse, or a NaN/inf value (a run must never continue from weights that already diverged)."""
    import torch
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        return f"{path.name} holds NaN/inf values ({key})"
        except Exception as error:  # safetensors raises its own SafetensorError
            return f"{path.name} does not parse as safetensors ({type(error).__name__}: {error})"
    return None


# Checkpoints this process found sound (by their files' sizes and modification times): the preflight and the
# trainer's resume check the same folder, and a full student's weights are worth reading once, not twice.
_SOUND_CHECKPOINTS: dict[tuple[str, bool], tuple] = {}


def _file_stamps(folder: Path) -> tuple:
    return tuple(
        (str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    )


def checkpoint_problem(folder: str | Path, check_weights: bool = False) -> str | None:
    """`incomplete_reason`, then (with `check_weights`, for a resume) `unhealthy_weights_reason`; a folder found
    sound earlier in this process, and unchanged since, is not read again."""
    folder = Path(folder)
    key = (str(folder.resolve()), check_weights)
    stamps = _file_stamps(folder)
    if _SOUND_CHECKPOINTS.get(key) == stamps:
        return None
    reason = incomplete_reason(folder)
    if reason is None and check_weights:
        reason = unhealthy_weights_reason(folder)
    if reason is None:
        _SOUND_CHECKPOINTS[key] = stamps
    return reason


def is_complete_checkpoint(folder: str | Path, verify_hashes: bool = True) -> bool:
    return incomplete_reason(folder, verify_hashes) is None


# What a full disk looks like when torch's zip writer, not Python, hits it (no errno reaches Python).
_DISK_FULL_MESSAGES = ("no space left", "file write failed", "unexpected pos", "basic_ios::clear")


def is_disk_full(error: BaseException) -> bool:
    """`error` (or an error it was raised from) is an `ENOSPC` or torch's writer failing the way a full disk makes it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


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

    1. the main process removes the oldest complete checkpoints beyond `limit - 1` (for `limit >= 2`: the newest
    is never removed before its successor is complete) and clears a stale `.checkpoint-{step}.tmp`; 2. every
    process calls `write_files(tmp)` (under FSDP each rank writes its shard into the same folder); 3. the main
    process calls `finalize_files(tmp)` (config, counters), writes the completeness marker, renames the folder to
    `checkpoint-{step}` and only then deletes the remaining old checkpoints and leftover temporary folders.

    Raises:
        `CheckpointError`: the disk is full ("No space left on <dir>", also when torch's writer reports it as a
        `RuntimeError`) or another OS error; the partial folder is removed and the newest earlier checkpoint kept.
    """
    output_dir = Path(output_dir)
    tmp = temporary_checkpoint_dir(output_dir, step)
    final = output_dir / f"checkpoint-{step}"
    try:
        if is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            if limit and limit >= 2:
                # Make the room the limit promises before writing (a full disk otherwise fails at limit + 1).
                prune_checkpoints(output_dir, limit - 1, keep=None, exclude=final)
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
    except (OSError, RuntimeError) as error:
        if is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            if limit == 1:
                advice = (
                    "--checkpoints_total_limit 1 keeps the previous checkpoint until the new one is complete, so the "
                    "disk needs room for two: free disk space"
                )
            else:
                advice = (
                    "Free disk space or lower --checkpoints_total_limit (to 2 or more, the oldest checkpoints are "
                    "removed before the next one is written)"
                )
            raise CheckpointError(
                f"No space left on {output_dir} while writing checkpoint-{step}: the partial folder was removed and "
                f"the previous checkpoints are kept. {advice}, then resume with --resume_from_checkpoint latest."
            ) from error
        if not isinstance(error, OSError):
            raise
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


def prune_checkpoints(
    output_dir: Path, limit: int | None, keep: Path | None = None, exclude: Path | None = None
) -> None:
    """Keep the newest `limit` complete checkpoints (never `keep`, the one just written); remove the rest, incomplete
    `checkpoint-N` folders older than `keep` and leftover `.checkpoint-N.tmp` folders of interrupted saves.
    `exclude` (the folder about to be rewritten) is neither counted nor removed."""
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
    complete = [p for p in list_checkpoints(output_dir, complete_only=True) if p not in (keep, exclude)]
    stale = complete[: max(len(complete) - (limit - (keep is not None)), 0)]
    for folder in stale:
        logger.info(f"Removing old checkpoint {folder}")
        shutil.rmtree(folder)


def resolve_checkpoint(output_dir: str | Path, checkpoint: str, check_weights: bool = False) -> Path | None:
    """`latest` -> the newest complete `checkpoint-N` of `output_dir` (or None), warning once for each one it skips
    (naming the file at fault); otherwise the given folder, which must exist and be complete.

    With `check_weights` (a resume) a checkpoint whose safetensors do not parse or hold NaN/inf is skipped too.
    """
    if checkpoint == "latest":
        for folder in reversed(list_checkpoints(output_dir)):
            reason = checkpoint_problem(folder, check_weights)
            if reason is None:
                return folder
            logger.warning(f"Skipping checkpoint {folder}: {reason}; trying the previous complete one.")
        return None
    path = Path(checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    reason = checkpoint_problem(path, check_weights)
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


def save_trainer_state(folder: str | Path, counters: dict, history: list[dict], run: dict | None = None) -> None:
    """The trainer's integer counters and per-step logs as JSON (`TRAINER_STATE_FILE`), with `run`: what the run
    resolved that its recipe does not say (the detected family, the student grid, the process count), which a resume
    compares (`read_run_facts`)."""
    payload = {"counters": {key: int(value) for key, value in counters.items()}, "history": history}
    if run is not None:
        payload["run"] = run
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


def read_run_facts(folder: str | Path) -> dict:
    """The `run` facts `save_trainer_state` recorded (empty for checkpoints written before they were)."""
    try:
        payload = json.loads((Path(folder) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    run = payload.get("run") if isinstance(payload, dict) else None
    return run if isinstance(run, dict) else {}


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
        if sharded:
            return
        if accelerator.is_main_process:
            for model in models:
                check(model)
                student_file = STUDENT_FULL_FILE if module.is_full else STUDENT_LORA_FILE
                save_file(student_state_dict(), Path(output_dir) / student_file)
                save_file(adapter_state_dict(module.backbone, FAKE_ADAPTER), Path(output_dir) / FAKE_LORA_FILE)
        # Every model was written above: accelerate must not save it a second time, nor walk its whole state dict on
        # the other processes (which fails on a quantized base's tensors, --base_quantization).
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
