"""Trainer callbacks (`diffusers_dmdr.callbacks`) and non-square training (`--resolution H --width W`)."""

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr.callbacks import TrainerCallback, check_callbacks, run_callbacks
from diffusers_dmdr.families import get_family
from diffusers_dmdr.trainer import DMDRTrainer


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_step_end(self, trainer, step, logs):
        # The logs handed over are the step's entry of the history, already recorded.
        assert trainer.history[-1] is logs and logs["step"] == step
        self.events.append(("step", step))

    def on_checkpoint(self, trainer, step, path):
        assert path.is_dir() and (path / "checkpoint_complete.json").is_file(), sorted(p.name for p in path.iterdir())
        self.events.append(("checkpoint", step, path.name))


class OnlyCheckpoints:
    """Duck-typed: no base class, one event."""

    def __init__(self):
        self.steps = []

    def on_checkpoint(self, trainer, step, path):
        self.steps.append(step)


def test_check_and_run_callbacks():
    with pytest.raises(TypeError, match="on_step_end, on_checkpoint"):
        check_callbacks([object()])
    with pytest.raises(ValueError, match="Unknown trainer callback event"):
        run_callbacks([], "on_epoch_end", trainer=None)
    calls, only = [], OnlyCheckpoints()

    class StepsOnly:
        def __init__(self, name):
            self.name = name

        def on_step_end(self, trainer, step, logs):
            calls.append((self.name, step))

    assert check_callbacks(None) == []
    # A callback without the event is skipped; the others run in order.
    run_callbacks(check_callbacks([StepsOnly("a"), only, StepsOnly("b")]), "on_step_end", None, step=1, logs={})
    assert calls == [("a", 1), ("b", 1)] and only.steps == []
    run_callbacks([only, StepsOnly("c"), only], "on_checkpoint", None, step=3, path=None)
    assert only.steps == [3, 3] and calls == [("a", 1), ("b", 1)]


def test_trainer_calls_the_callbacks_at_steps_and_checkpoints(tiny_teacher_dirs, prompt_file, tmp_path):
    recorder, only = Recorder(), OnlyCheckpoints()
    config = tiny_config(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, max_train_steps=2, checkpointing_steps=1, update_ratio=1
    )
    teacher = get_family("sdxl").load_teacher(config.pretrained_model_name_or_path)
    trainer = DMDRTrainer(config, teacher, PROMPTS, callbacks=[recorder, only])
    trainer.train()
    # A checkpoint due mid-run and the final one.
    assert recorder.events == [
        ("step", 1),
        ("checkpoint", 1, "checkpoint-1"),
        ("step", 2),
        ("checkpoint", 2, "checkpoint-2"),
    ]
    assert only.steps == [1, 2]


def test_non_square_training_uses_height_and_width(tiny_teacher_dirs, prompt_file, tmp_path):
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, resolution=32, width=64)
    assert config.image_size == (32, 64) and config.conditioning_size == (32, 64)
    teacher = get_family("sdxl").load_teacher(config.pretrained_model_name_or_path)
    trainer = DMDRTrainer(config, teacher, PROMPTS)
    factor = trainer.pipeline.vae_scale_factor
    assert trainer.latent_shape[1:] == (32 // factor, 64 // factor)
    # SDXL's micro-conditioning says (height, width), as the stock pipeline does for a 32 x 64 call.
    time_ids = trainer.encode(["a red cat"])["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[32.0, 64.0, 0.0, 0.0, 32.0, 64.0]]
    images = trainer.decode(trainer.sample_latents(["a red cat"], torch.Generator().manual_seed(0)))
    assert images.shape[-2:] == (32, 64)
    # Square runs keep an int (and so their prompt-cache keys).
    assert tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path).conditioning_size == 64


def test_width_is_validated_before_any_weight_loads(tiny_teacher_dirs, prompt_file, tmp_path):
    from diffusers_dmdr.preflight import check_run_inputs

    with pytest.raises(ValueError, match="--width must be a positive"):
        tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, width=4)
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, width=66)
    with pytest.raises(ValueError, match="--width 66 is not divisible"):
        check_run_inputs(config)
