"""Atomic checkpoints: fault injection at each stage of a save, SIGKILL mid-save, `latest`, limits, a full disk, and
no pickle loaded from a checkpoint."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr import checkpointing
from diffusers_dmdr.checkpointing import (
    COMPLETE_MARKER,
    CheckpointError,
    atomic_checkpoint_save,
    list_checkpoints,
    load_accelerator_state_safely,
    resolve_checkpoint,
)


class Interrupted(BaseException):
    """Stands for a kill or Ctrl-C at a chosen point of the save (not an `Exception`, like KeyboardInterrupt)."""


def write_two_files(folder: Path) -> None:
    (folder / "student_lora.safetensors").write_bytes(b"s" * 64)
    (folder / "fake_lora.safetensors").write_bytes(b"f" * 64)


def save(output_dir, step, limit=None, writer=write_two_files):
    return atomic_checkpoint_save(output_dir, step, writer, limit=limit)


def test_complete_checkpoints_rotate_to_the_limit(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    marker = json.loads((tmp_path / "checkpoint-3" / COMPLETE_MARKER).read_text())
    assert marker == {"step": 3, "files": {"fake_lora.safetensors": 64, "student_lora.safetensors": 64}}
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert not list(tmp_path.glob(".checkpoint-*"))


def _fail_after_first_file(folder: Path) -> None:
    (folder / "student_lora.safetensors").write_bytes(b"s" * 64)
    raise Interrupted


@pytest.mark.parametrize("stage", ["after_first_file", "before_rename", "during_pruning"])
def test_interrupted_save_leaves_a_complete_checkpoint_for_latest(tmp_path, monkeypatch, stage, caplog):
    save(tmp_path, 1, limit=1)
    writer = write_two_files
    if stage == "after_first_file":
        writer = _fail_after_first_file
    elif stage == "before_rename":

        def no_rename(source, target):
            raise Interrupted

        monkeypatch.setattr(checkpointing.os, "replace", no_rename)
    else:
        real_rmtree = shutil.rmtree

        def interrupted_rmtree(path, *args, **kwargs):
            if Path(path).name == "checkpoint-1":
                raise Interrupted
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(checkpointing.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(Interrupted):
        save(tmp_path, 2, limit=1, writer=writer)
    monkeypatch.undo()

    latest = resolve_checkpoint(tmp_path, "latest")
    expected = "checkpoint-2" if stage == "during_pruning" else "checkpoint-1"
    assert latest == tmp_path / expected
    assert checkpointing.is_complete_checkpoint(latest)
    # With a limit of 1 a good checkpoint always remains, and the next save cleans up.
    save(tmp_path, 3, limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_latest_skips_incomplete_folders_and_says_so(tmp_path, caplog):
    save(tmp_path, 1)
    save(tmp_path, 2)
    # A folder left by an older, non-atomic writer or truncated afterwards.
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-2" / "fake_lora.safetensors").write_bytes(b"f" * 10)
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert "checkpoint-3: no checkpoint_complete.json" in caplog.text
    assert "fake_lora.safetensors has 10 bytes instead of 64" in caplog.text
    with pytest.raises(CheckpointError, match="checkpoint-3 is not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-3")


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, 1, limit=1)

    def disk_full(folder):
        (folder / "student_lora.safetensors").write_bytes(b"s" * 8)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=f"No space left on {tmp_path} while writing checkpoint-2"):
        save(tmp_path, 2, limit=1, writer=disk_full)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert checkpointing.is_complete_checkpoint(tmp_path / "checkpoint-1")
    assert not list(tmp_path.glob(".checkpoint-*"))


SLOW_SAVE = """
import sys, time
from pathlib import Path
from diffusers_dmdr.checkpointing import atomic_checkpoint_save

def writer(folder):
    (folder / "student_lora.safetensors").write_bytes(b"s" * 64)
    (Path(sys.argv[1]) / "first_file_written").touch()
    time.sleep(60)

atomic_checkpoint_save(sys.argv[1], 2, writer, limit=1)
"""


def test_sigkill_mid_save_keeps_latest_resumable(tmp_path):
    save(tmp_path, 1, limit=1)
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "first_file_written").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the saving process did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert (tmp_path / ".checkpoint-2.tmp").is_dir()  # the kill left a partial folder ...
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"  # ... that `latest` never takes


def test_planted_pickle_is_refused_and_never_run(tmp_path):
    from accelerate import Accelerator

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    save(tmp_path, 1)
    folder = tmp_path / "checkpoint-1"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(
        CheckpointError, match="custom_checkpoint_0.pkl: checkpoints of diffusers-dmdr hold no pickled"
    ):
        load_accelerator_state_safely(Accelerator(cpu=True), folder)
    assert not marker.exists()


def test_optimizer_state_loads_with_weights_only(tmp_path):
    """Guards the accelerate internals `load_accelerator_state_safely` relies on: `load_kwargs` reach `torch.load`
    of the optimizer state (a pickle there is refused) and `_custom_objects` lists registered objects."""
    from accelerate import Accelerator

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    folder = tmp_path / "state"
    accelerator.save_state(str(folder))
    load_accelerator_state_safely(accelerator, folder)  # a genuine state loads
    torch.save({"state": Payload()}, folder / "optimizer.bin")
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_accelerator_state_safely(accelerator, folder)
    assert not marker.exists()
    accelerator.register_for_checkpointing(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    assert accelerator._custom_objects, "accelerate renamed `_custom_objects`: update load_accelerator_state_safely"
    with pytest.raises(CheckpointError, match="register_for_checkpointing"):
        load_accelerator_state_safely(accelerator, folder)


def test_trainer_resumes_latest_after_a_save_killed_after_its_first_file(
    tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch
):
    """In the trainer: the save of step 2 dies after writing its first weight file; with a limit of 1 the step-1
    checkpoint remains, `latest` resumes it (counters from JSON, no pickle) and the summary covers every step."""
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer

    def make(**overrides):
        config = tiny_config(
            tiny_teacher_dirs["sdxl"],
            prompt_file,
            tmp_path,
            max_train_steps=2,
            cold_start_steps=2,
            checkpointing_steps=1,
            checkpoints_total_limit=1,
            update_ratio=1,
            **overrides,
        )
        return DMDRTrainer(config, get_family("sdxl").load_teacher(config.pretrained_model_name_or_path), ["a cat"])

    real_save_file, calls = checkpointing.save_file, []

    def dying_save_file(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # step 2's first file is written, then the process "dies"
            raise Interrupted
        return real_save_file(tensors, path)

    monkeypatch.setattr(checkpointing, "save_file", dying_save_file)
    with pytest.raises(Interrupted):
        make().train()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    files = sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir())
    # accelerate's RNG states (`random_states_0.pkl`) load with weights_only=True; no custom object is pickled.
    assert "trainer_state.json" in files and not any(name.startswith("custom_checkpoint") for name in files)

    resumed = make(resume_from_checkpoint="latest")
    history = resumed.train()
    assert [row["step"] for row in history] == [2]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [row["step"] for row in summary["history"]] == [1, 2]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
