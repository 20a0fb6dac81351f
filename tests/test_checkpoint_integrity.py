"""Checkpoint integrity (issue 27.3): content hashes in the completeness marker, corrupt or NaN checkpoints skipped for
the previous complete one on resume, and a full disk that says so and leaves the previous checkpoint."""

import errno
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from diffusers_dmdr import checkpointing
from diffusers_dmdr.checkpointing import (
    COMPLETE_MARKER,
    CheckpointError,
    atomic_checkpoint_save,
    list_checkpoints,
    resolve_checkpoint,
)


def weights_writer(value: float = 0.5, size: int = 4096):
    def write(folder):
        save_file({"lora.weight": torch.full((size,), value)}, folder / "student_lora.safetensors")
        save_file({"lora.weight": torch.full((16,), value)}, folder / "fake_lora.safetensors")

    return write


def save(output_dir, step, writer=None, limit=None):
    return atomic_checkpoint_save(output_dir, step, writer or weights_writer(), limit=limit)


def test_marker_lists_sha256_of_every_file(tmp_path):
    folder = save(tmp_path, 1)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert set(marker["sha256"]) == {"student_lora.safetensors", "fake_lora.safetensors"}
    assert marker["sha256"]["fake_lora.safetensors"] == checkpointing.file_sha256(folder / "fake_lora.safetensors")


def test_flipped_block_of_the_same_size_is_skipped_with_one_warning(tmp_path, caplog):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    lora = latest / "student_lora.safetensors"
    data = bytearray(lora.read_bytes())
    size = len(data)
    data[-4096 - 100 : -100] = bytes(b ^ 0xFF for b in data[-4096 - 100 : -100])  # 4 KiB flipped inside the tensor
    lora.write_bytes(bytes(data))
    assert lora.stat().st_size == size
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "student_lora.safetensors does not match its sha256" in warnings[0]
    with pytest.raises(CheckpointError, match="student_lora.safetensors does not match its sha256"):
        resolve_checkpoint(tmp_path, "checkpoint-2")


def test_corrupt_header_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    """A file whose bytes match the marker but do not parse (written corrupt) is skipped, not a stopped run."""
    save(tmp_path, 1)

    def corrupt_writer(folder):
        weights_writer()(folder)
        (folder / "student_lora.safetensors").write_bytes(b"\xff" * 64)

    save(tmp_path, 2, writer=corrupt_writer)
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"  # complete, as written
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest", check_weights=True) == tmp_path / "checkpoint-1"
    assert "student_lora.safetensors does not parse as safetensors" in caplog.text


def test_nan_weights_are_refused_on_resume(tmp_path, caplog):
    save(tmp_path, 1)
    save(tmp_path, 2, writer=weights_writer(float("nan")))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path, "latest", check_weights=True) == tmp_path / "checkpoint-1"
    assert "checkpoint-2: fake_lora.safetensors holds NaN/inf values (lora.weight)" in caplog.text
    with pytest.raises(CheckpointError, match="holds NaN/inf"):
        resolve_checkpoint(tmp_path, "checkpoint-2", check_weights=True)


def test_old_markers_without_hashes_still_resume(tmp_path):
    folder = save(tmp_path, 1)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    del marker["sha256"]
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert resolve_checkpoint(tmp_path, "latest", check_weights=True) == folder


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # What torch's zip writer raises when the disk fills (no errno reaches Python).
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4310"),
        RuntimeError("basic_ios::clear: iostream error"),
    ],
    ids=["enospc", "file_write_failed", "unexpected_pos", "basic_ios"],
)
def test_full_disk_says_no_space_and_keeps_the_previous_checkpoint(tmp_path, error):
    save(tmp_path, 1, limit=2)
    save(tmp_path, 2, limit=2)

    def disk_full(folder):
        (folder / "student_lora.safetensors").write_bytes(b"s" * 8)
        raise error

    with pytest.raises(CheckpointError, match=f"No space left on {tmp_path} while writing checkpoint-3") as raised:
        save(tmp_path, 3, writer=disk_full, limit=2)
    # The limit's room was made before the write: the oldest went, the newest complete one is kept.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resolve_checkpoint(tmp_path, "latest", check_weights=True) == tmp_path / "checkpoint-2"
    assert "removed before the next one is written" in str(raised.value)
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_full_disk_with_a_limit_of_one_says_why_it_cannot_prune_first(tmp_path):
    save(tmp_path, 1, limit=1)

    def disk_full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="keeps the previous checkpoint until the new one is complete"):
        save(tmp_path, 2, writer=disk_full, limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_a_bug_in_the_writer_is_not_called_a_full_disk(tmp_path):
    save(tmp_path, 1)

    def buggy(folder):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        save(tmp_path, 2, writer=buggy)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_trainer_resumes_the_previous_checkpoint_when_the_newest_holds_nan(
    tiny_teacher_dirs, prompt_file, tmp_path, caplog
):
    """In the trainer: checkpoint-2's student LoRA holds NaN (its marker matching, as if written so); `latest` resumes
    checkpoint-1 with one warning naming the file, and the run's last healthy checkpoint is checkpoint-1's successor,
    never the NaN one."""
    from conftest import tiny_config
    from safetensors.torch import load_file

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
            update_ratio=1,
            **overrides,
        )
        return DMDRTrainer(config, get_family("sdxl").load_teacher(config.pretrained_model_name_or_path), ["a cat"])

    make().train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    newest = tmp_path / "checkpoint-2"
    lora = load_file(newest / "student_lora.safetensors")
    save_file(
        {key: torch.full_like(value, float("nan")) for key, value in lora.items()}, newest / "student_lora.safetensors"
    )
    checkpointing.write_complete_marker(newest, 2)

    resumed = make(resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING):
        history = resumed.train()
    assert "checkpoint-2: student_lora.safetensors holds NaN/inf values" in caplog.text
    assert [row["step"] for row in history] == [2]
    assert resumed.last_checkpoint == tmp_path / "checkpoint-2"
    for value in load_file(tmp_path / "checkpoint-2" / "student_lora.safetensors").values():
        assert torch.isfinite(value).all()
