"""The objective interface: an objective registered beside DMDR runs in the trainer's unchanged loop."""

import math

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr import trainer as trainer_module
from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.families import get_family
from diffusers_dmdr.method import registry
from diffusers_dmdr.method.objective import DMDRObjective, Objective
from diffusers_dmdr.method.registry import OBJECTIVES, make_objective
from diffusers_dmdr.method.rl import DPOObjective, GRPOObjective


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


class ShrinkObjective(Objective):
    """Student only, no fake score: pull the student's one-step prediction from pure noise towards zero."""

    name = "shrink"

    def rollout(self, iteration, global_step, prompts, first_row, micro_batches):
        size = len(prompts) // micro_batches
        generators = [torch.Generator().manual_seed(1000 * iteration + first_row + row) for row in range(len(prompts))]
        noise = self.routes.initial_noise(len(prompts), generators)
        return [
            (self.routes.encode(prompts[i * size : (i + 1) * size]), noise[i * size : (i + 1) * size])
            for i in range(micro_batches)
        ]

    def generator_loss(self, batch, global_step):
        condition, noise = batch
        with self.routes.autocast():
            x0 = self.routes.student(noise, torch.ones(noise.shape[0]), condition)
        loss = x0.float().square().mean()
        return loss, {"loss": loss.item()}


def lora_weights(model, adapter_name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter_name}." in n}


def test_a_registered_objective_runs_in_the_trainers_loop(tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.OBJECTIVES, ShrinkObjective.name, ShrinkObjective)
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, update_ratio=3)
    # The trainer runs the objective `--rl` names (the flag's choices are the shipped objectives; set after checks).
    config.rl = ShrinkObjective.name
    trainer = trainer_module.DMDRTrainer(
        config, get_family("sdxl").load_teacher(config.pretrained_model_name_or_path), PROMPTS
    )
    assert isinstance(trainer.objective, ShrinkObjective)
    with torch.no_grad():  # LoRA B starts at zero: give the student an adapter output to move
        for name, parameter in trainer.student_model.named_parameters():
            if "lora_B" in name and f".{STUDENT_ADAPTER}." in name:
                parameter.normal_(std=0.5)
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    fake_before = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    history = trainer.train()
    # The objective's TTUR ratio (1), not the config's (3): one iteration per generator step, no fake-score update.
    assert [row["step"] for row in history] == [1, 2] and trainer.state.iteration == 2
    assert all(math.isnan(row["loss_fake"]) and row["step_skipped"] == 0.0 for row in history)
    student_after = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    assert any(not torch.equal(student_after[n], student_before[n]) for n in student_before)
    for name, value in lora_weights(trainer.guidance_model, FAKE_ADAPTER).items():
        assert torch.equal(value, fake_before[name]), name
    assert (tmp_path / "checkpoint-2" / "student_lora.safetensors").is_file()


def test_objectives_by_name():
    assert OBJECTIVES == {"refl": DMDRObjective, "grpo": GRPOObjective, "dpo": DPOObjective}
    with pytest.raises(ValueError, match="Unknown training objective 'ppo'; the objectives are dpo, grpo, refl"):
        make_objective("ppo", config=None, routes=None)
