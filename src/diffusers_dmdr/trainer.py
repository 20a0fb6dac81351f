"""DMDRTrainer: orchestration of a DMDR run (accelerate, optimizers, loop, TTUR, logging, checkpoints).

The trainer holds no formula: noise math lives in the scheduler, losses in `losses.py`, schedules in
`schedules.py`, the sampler in `simulation.py`.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import schedules
from .adapters import (
    FAKE_ADAPTER,
    STUDENT_ADAPTER,
    adapter_state_dict,
    build_student_and_guidance,
    load_adapter_state_dict,
    lora_scale,
    parse_target_modules,
    swapped_weights,
    trainable_parameters,
)
from .checkpointing import (
    CONFIG_FILE,
    FAKE_LORA_FILE,
    STUDENT_FULL_FILE,
    STUDENT_LORA_FILE,
    atomic_checkpoint_save,
    load_accelerator_state_safely,
    load_trainer_state,
    load_weights_file,
    resolve_checkpoint,
    save_trainer_state,
)
from .config import DMDRConfig
from .data import PromptSampler
from .denoisers import Denoiser, guided_x0
from .families import TeacherComponents
from .families.base import repeat_condition, student_scheduler_for
from .guards import DivergenceError, DivergenceGuard, resume_advice, trainable_weight_norm
from .losses import anchor_loss, dmd_loss, fake_score_loss, reward_tilt_weights
from .rewards import compute_reward_loss
from .simulation import backward_simulation, sample_student
from .utils import log_prompt_truncation_once


logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_consecutive_nonfinite_steps` NaN/inf losses in a row."""


@dataclass
class TrainingState:
    """Counters saved with every checkpoint. Random draws are a function of `(seed, iteration, rank)`, so these
    counters are all an exact resume needs beyond the weights and optimizer states."""

    iteration: int = 0
    global_step: int = 0
    nonfinite_total: int = 0
    generator_nonfinite_in_a_row: int = 0
    fake_nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def create_accelerator(config: DMDRConfig) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / config.logging_dir)
    )
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
    )


class DMDRTrainer:
    """Distil `teacher` into a few-step student with DMD, then DMD + rewards (https://huggingface.co/papers/2511.13649).

    Args:
        config ([`DMDRConfig`]): the run's configuration (validated).
        teacher ([`TeacherComponents`]): the loaded teacher pipeline in float32; its backbone becomes the frozen base.
        prompts (`list[str]`): the training prompts.
        rewards (`list[LoadedReward]`): rewards of stage 2 (and of RT-DM weighting in stage 1).
        eval_rewards (`list[LoadedReward]`): held-out rewards, logged only (reward-hacking monitor).
        reward_vae (`torch.nn.Module`, *optional*): a tiny autoencoder that decodes x0 for the rewards instead of the
            teacher's VAE (validation grids and the export always use the teacher's VAE).
        accelerator (`Accelerator`, *optional*): created from `config` when not given.
    """

    def __init__(
        self,
        config: DMDRConfig,
        teacher: TeacherComponents,
        prompts: list[str],
        rewards: list | None = None,
        eval_rewards: list | None = None,
        accelerator: Accelerator | None = None,
        reward_vae: torch.nn.Module | None = None,
    ):
        self.config = config
        self.accelerator = accelerator or create_accelerator(config)
        self.family = teacher.family
        self.pipeline = teacher.pipeline
        # A prompt longer than the tokenizer's limit is reported once, not echoed at every step.
        log_prompt_truncation_once(type(self.pipeline).__module__)
        self.rewards = list(rewards or [])
        self.eval_rewards = list(eval_rewards or [])
        self.state = TrainingState()
        self.mode = config.backward_simulation or self.family.default_backward_simulation
        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )

        # 1. Frozen parts: text encoders and VAE in the mixed-precision dtype (an fp16 VAE that asks for an upcast
        #    stays in float32, as diffusers' SDXL scripts do to avoid NaN decodes).
        for encoder in self.family.text_encoders(self.pipeline):
            encoder.requires_grad_(False).eval().to(device, self.weight_dtype)
        self.vae = teacher.vae.requires_grad_(False).eval()
        vae_upcast = self.weight_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        vae_dtype = torch.float32 if vae_upcast else self.weight_dtype
        self.vae.to(device)
        if self.vae.dtype != vae_dtype:
            self.vae.to(vae_dtype)
        self.reward_vae = self.vae
        if reward_vae is not None:
            self.reward_vae = reward_vae.requires_grad_(False).eval().to(device, self.weight_dtype)

        # 2. Student grid and sampler.
        timesteps = config.student_timesteps or self.family.default_student_timesteps(
            config.num_student_steps, config.shift
        )
        self.scheduler = student_scheduler_for(teacher, timesteps, config.backward_simulation, config.shift)
        self.latent_shape = (
            self.family.latent_channels(teacher.backbone),
            config.resolution // self.pipeline.vae_scale_factor,
            config.resolution // self.pipeline.vae_scale_factor,
        )

        # 3. Networks on one frozen base: student (LoRA or full copy) and guidance (fake LoRA; real = scaled fake).
        student_targets = parse_target_modules(config.lora_target_modules, self.family.student_lora_targets)
        fake_targets = parse_target_modules(config.fake_lora_target_modules, self.family.fake_lora_targets)
        student, guidance = build_student_and_guidance(
            teacher.backbone,
            config.training_mode,
            self.weight_dtype,
            student_lora={"rank": config.lora_rank, "alpha": config.lora_alpha, "target_modules": student_targets},
            fake_lora={"rank": config.fake_lora_rank, "alpha": config.fake_lora_alpha, "target_modules": fake_targets},
            seed=config.seed,
        )
        student.to(device)
        guidance.to(device)
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            guidance.enable_gradient_checkpointing()
        self._student_module, self._guidance_module = student, guidance

        # 4. Optimizers and LR schedules; one Accelerator prepares both networks and both optimizers.
        student_optimizer = self._make_optimizer(student, config.learning_rate, config.adam_weight_decay)
        fake_optimizer = self._make_optimizer(guidance, config.learning_rate_fake, config.adam_weight_decay_fake)
        student_lr, fake_lr = self._make_lr_schedulers(student_optimizer, fake_optimizer)
        (
            self.student,
            self.guidance,
            self.student_optimizer,
            self.fake_optimizer,
            self.student_lr,
            self.fake_lr,
        ) = self.accelerator.prepare(student, guidance, student_optimizer, fake_optimizer, student_lr, fake_lr)
        self.student_denoiser = Denoiser(self.student, self.family, self.scheduler)
        self.guidance_denoiser = Denoiser(self.guidance, self.family, self.scheduler)
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        # `self.state` is saved as JSON by `save_checkpoint`, never registered with accelerate (which pickles it).

        self.prompt_sampler = PromptSampler(
            prompts,
            config.train_batch_size,
            config.seed,
            self.accelerator.process_index,
            self.accelerator.num_processes,
        )
        self.empty_condition = self.family.encode_prompts(self.pipeline, [""], config.resolution, device)
        self.history: list[dict] = []
        # Logs of the steps before a resume (from the checkpoint), so that train_summary.json covers the whole run.
        self.resumed_history: list[dict] = []
        self.last_checkpoint: Path | None = None
        # Set by `train()` when --anchor_loss_weight > 0: the student's weights as the run starts.
        self.anchor_weights: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------------
    def _make_optimizer(self, model: torch.nn.Module, learning_rate: float, weight_decay: float):
        if self.config.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as error:
                raise ImportError(
                    "--use_8bit_adam needs bitsandbytes: `pip install diffusers-dmdr[bnb]` (or `pip install "
                    "bitsandbytes`), or drop --use_8bit_adam."
                ) from error
            optimizer_class = bnb.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(
            trainable_parameters(model),
            lr=learning_rate,
            betas=(self.config.adam_beta1, self.config.adam_beta2),
            weight_decay=weight_decay,
            eps=self.config.adam_epsilon,
        )

    def _make_lr_schedulers(self, student_optimizer, fake_optimizer):
        from diffusers.optimization import get_scheduler

        # Prepared schedulers step once per process per call (diffusers PR #8312), hence the scaling.
        processes, ratio = self.accelerator.num_processes, self.config.update_ratio
        student_lr = get_scheduler(
            self.config.lr_scheduler,
            optimizer=student_optimizer,
            num_warmup_steps=self.config.lr_warmup_steps * processes,
            num_training_steps=self.config.max_train_steps * processes,
        )
        fake_lr = get_scheduler(
            self.config.lr_scheduler,
            optimizer=fake_optimizer,
            num_warmup_steps=self.config.lr_warmup_steps * ratio * processes,
            num_training_steps=self.config.max_train_steps * ratio * processes,
        )
        return student_lr, fake_lr

    @property
    def student_model(self) -> torch.nn.Module:
        """The unwrapped student backbone (LoRA mode: the shared base with the `student` adapter)."""
        return self._student_module

    @property
    def guidance_model(self) -> torch.nn.Module:
        """The unwrapped guidance backbone (the shared base with the `fake` adapter)."""
        return self._guidance_module

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict:
        return self.family.encode_prompts(self.pipeline, prompts, self.config.resolution, self.accelerator.device)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        shape = (batch_size, *self.latent_shape)
        return randn_tensor(shape, generator=generator, device=self.accelerator.device, dtype=torch.float32)

    @torch.no_grad()
    def sample_latents(
        self, prompts: list[str], generator: torch.Generator | None = None, initial_noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The student's N-step sampler (the exported pipeline reproduces it for the same generator)."""
        condition = self.encode(prompts)
        noise = self.initial_noise(len(prompts), generator) if initial_noise is None else initial_noise
        denoiser = Denoiser(self.student_model, self.family, self.scheduler)
        with self.accelerator.autocast():
            predictions = sample_student(
                lambda sample, level: denoiser(sample, level, condition),
                noise,
                self.scheduler,
                deterministic=self.scheduler.config.deterministic,
                generator=generator,
            )
        return predictions[-1].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.decode(self.vae, latents)

    def decode_for_rewards(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable decode on the reward path (the tiny autoencoder when one is given)."""
        return self.family.decode(self.reward_vae, latents)

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run until `max_train_steps` generator updates; returns the per-step logs."""
        config = self.config
        if config.resume_from_checkpoint:
            self.load_checkpoint(config.resume_from_checkpoint)
        # The anchor is the student as this run starts (after any resume), frozen.
        if config.anchor_loss_weight > 0:
            self.anchor_weights = [p.detach().clone() for p in trainable_parameters(self.student_model)]
        if self.accelerator.is_main_process and self.accelerator.log_with:
            tracker_config = {
                k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(config).items()
            }
            self.accelerator.init_trackers(config.tracker_project_name, config=tracker_config)
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.state.global_step,
            desc="DMDR generator steps",
            disable=not self.accelerator.is_local_main_process,
        )
        fake_losses: list[float] = []
        # Checkpoints are written only after a healthy step: one due during skipped steps waits for the next.
        guard, checkpoint_pending = DivergenceGuard.from_config(config), False
        guard.start(self._weight_norms())
        while self.state.global_step < config.max_train_steps:
            iteration = self.state.iteration
            prompts = self.prompt_sampler.batch(iteration)
            rng = np.random.default_rng([config.seed, iteration, self.accelerator.process_index])
            generator = torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))
            condition = self.encode(prompts)
            simulation = self._simulate(condition, rng, generator)
            # With DMD switched off (reward-only ablations) the fake score has no reader: skip its update.
            if config.dmd_loss_weight > 0:
                fake_loss = self._fake_score_step(simulation.clean_sample, condition, rng, generator)
                if fake_loss is not None:
                    fake_losses.append(fake_loss)
            self.state.iteration += 1
            if self.state.iteration % config.update_ratio:
                continue
            logs = self._generator_step(prompts, simulation, condition, rng, generator)
            logs["loss_fake"] = float(np.mean(fake_losses)) if fake_losses else float("nan")
            fake_losses = []
            logs.update(self._schedule_logs())
            self.state.global_step += 1
            logs["nonfinite_steps"] = self.state.nonfinite_total
            self.history.append({"step": self.state.global_step, **logs})
            self.accelerator.log(logs, step=self.state.global_step)
            progress.update(1)
            progress.set_postfix(
                {k: f"{v:.4g}" for k, v in logs.items() if k.startswith(("loss", "reward", "dg", "rs"))}
            )
            self._check_divergence(guard, logs)
            step = self.state.global_step
            due = config.checkpointing_steps and step % config.checkpointing_steps == 0
            if (due or checkpoint_pending) and step < config.max_train_steps:
                checkpoint_pending = not self._step_was_healthy(logs)
                if not checkpoint_pending:
                    self.save_checkpoint()
            if config.validation_prompts and config.validation_steps and step % config.validation_steps == 0:
                self.log_validation()
        progress.close()
        if self._step_was_healthy(self.history[-1] if self.history else {}):
            self.save_checkpoint()
        else:
            logger.warning(f"The last step was skipped: no final checkpoint. {resume_advice(self.last_checkpoint)}")
        if config.validation_prompts and config.max_train_steps % max(config.validation_steps, 1):
            self.log_validation()
        self._write_summary()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.history

    def _weight_norms(self) -> dict[str, float]:
        return {
            "student": trainable_weight_norm(trainable_parameters(self.student_model)),
            "fake score": trainable_weight_norm(trainable_parameters(self.guidance_model)),
        }

    def _step_was_healthy(self, logs: dict) -> bool:
        """The generator update of `logs` was applied and no update of either network is being skipped."""
        state = self.state
        return (
            not logs.get("step_skipped") and state.generator_nonfinite_in_a_row == state.fake_nonfinite_in_a_row == 0
        )

    def _check_divergence(self, guard: DivergenceGuard, logs: dict) -> None:
        losses = {"generator loss": logs.get("loss"), "fake-score loss": logs.get("loss_fake")}
        reason = guard.check(losses, self._weight_norms())
        if reason is not None:
            raise DivergenceError(
                f"Training diverged at generator step {self.state.global_step}: {reason}; stopped without writing "
                f"a checkpoint of these weights. {resume_advice(self.last_checkpoint)}"
            )

    def _replica_checksums(self) -> list[float]:
        """Sum of every trainable weight on each process: data parallel replicas must agree exactly."""
        local = torch.stack(
            [
                torch.stack([p.detach().double().sum() for p in trainable_parameters(m)]).sum()
                for m in (self.student_model, self.guidance_model)
            ]
        ).to(self.accelerator.device)
        return self.accelerator.gather(local[None]).cpu().tolist()

    def _write_summary(self) -> None:
        """`output_dir/train_summary.json`: what ran (processes, steps, skipped steps, replica agreement, last logs)."""
        checksums = self._replica_checksums()
        if not self.accelerator.is_main_process:
            return
        summary = {
            "num_processes": self.accelerator.num_processes,
            "global_step": self.state.global_step,
            "iterations": self.state.iteration,
            "nonfinite_steps": self.state.nonfinite_total,
            "replica_checksums": checksums,
            "replicas_identical": all(row == checksums[0] for row in checksums),
            "student_timesteps": list(self.scheduler.config.training_timesteps),
            "history": self.resumed_history + self.history,
        }
        path = Path(self.config.output_dir) / "train_summary.json"
        path.write_text(json.dumps(summary, indent=2), encoding="utf-8")

    def _simulate(self, condition: dict, rng: np.random.Generator, generator: torch.Generator):
        batch_size = condition["encoder_hidden_states"].shape[0]
        step_index = torch.from_numpy(rng.integers(0, len(self.scheduler.noise_levels), size=batch_size))
        with self.accelerator.autocast():
            return backward_simulation(
                lambda sample, level: self.student_denoiser(sample, level, condition),
                self.initial_noise(batch_size, generator),
                self.scheduler,
                self.mode,
                generator,
                step_index,
            )

    def _renoise_levels(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        alpha, beta = schedules.renoise_beta_params(
            self.state.global_step,
            self.config.dynamic_steps,
            self.config.renoise_beta_alpha,
            self.config.renoise_beta_beta,
        )
        return schedules.sample_renoise_levels(batch_size, alpha, beta, rng).to(self.accelerator.device)

    def _fake_score_step(self, clean_sample, condition, rng, generator) -> float | None:
        """Denoising loss of the fake score on the detached student sample at a DynaRS noise level."""
        noise_level = self._renoise_levels(clean_sample.shape[0], rng)
        noise = randn_tensor(
            clean_sample.shape, generator=generator, device=clean_sample.device, dtype=clean_sample.dtype
        )
        noisy_sample = self.scheduler.add_noise_at(clean_sample, noise, noise_level)
        target = self.scheduler.training_target(clean_sample, noise, noise_level)
        self.guidance.train()
        with (
            self.accelerator.autocast(),
            lora_scale(self.guidance_model, FAKE_ADAPTER, self.config.fake_score_lora_scale),
        ):
            prediction = self.guidance_denoiser.predict(noisy_sample, noise_level, condition)
        loss = fake_score_loss(prediction, target)
        stepped = self._apply_update(loss, self.guidance, self.fake_optimizer, self.fake_lr, "fake")
        return loss.item() if stepped else None

    def _generator_step(self, prompts, simulation, condition, rng, generator) -> dict:
        """DMD (plus rewards in stage 2) on the student's one-step prediction from its simulated input."""
        config, logs = self.config, {}
        in_stage_two = self.state.global_step >= config.cold_start_steps
        # The anchor swaps weights in place, so it must run before the student's graph is built.
        x0_anchor = None if self.anchor_weights is None else self._anchor_x0(simulation, condition)
        self.student.train()
        with self.accelerator.autocast():
            x0_student = self.student_denoiser(simulation.student_input, simulation.noise_level, condition)
        loss = torch.zeros((), device=x0_student.device)
        if config.dmd_loss_weight > 0:
            sample_weights = None
            if config.reward_tilt and not in_stage_two:
                sample_weights = self._reward_tilt(simulation.final_sample, prompts)
            loss_dmd, logs["real_guidance_scale"] = self._dmd_loss(
                x0_student, condition, sample_weights, rng, generator
            )
            loss = loss + config.dmd_loss_weight * loss_dmd
            logs["loss_dmd"] = loss_dmd.item()
        if x0_anchor is not None:
            loss_anchor = anchor_loss(x0_student, x0_anchor)
            loss = loss + config.anchor_loss_weight * loss_anchor
            logs["loss_anchor"] = loss_anchor.item()
        images = None
        if in_stage_two and self.rewards:
            with self.accelerator.autocast():
                images = self.decode_for_rewards(x0_student)
                loss_rl, scores = compute_reward_loss(self.rewards, images, prompts)
            loss = loss + loss_rl
            logs["loss_rl"] = loss_rl.item()
            logs.update({f"reward/{name}": score.item() for name, score in scores.items()})
        if self.eval_rewards:
            logs.update(self._monitor(x0_student.detach(), images, prompts, condition, rng, generator))
        stepped = self._apply_update(loss, self.student, self.student_optimizer, self.student_lr, "generator")
        logs.update(loss=loss.item(), step_skipped=float(not stepped))
        return logs

    def _dmd_loss(self, x0_student, condition, sample_weights, rng, generator) -> tuple[torch.Tensor, float]:
        """Re-noise the student's x0 at a DynaRS level, query the real score (DynaDG scale, jittered CFG) and the fake
        score without gradient, and form the normalised DMD surrogate."""
        config, batch_size = self.config, x0_student.shape[0]
        noise_level = self._renoise_levels(batch_size, rng)
        noise = randn_tensor(x0_student.shape, generator=generator, device=x0_student.device, dtype=x0_student.dtype)
        noisy_student = self.scheduler.add_noise_at(x0_student.detach(), noise, noise_level)
        guidance_scale = schedules.sample_guidance_scale(config.real_guidance_scale, config.guidance_scale_jitter, rng)
        real_scale = schedules.real_score_lora_scale(
            self.state.global_step, config.dynamic_steps, config.real_score_lora_scale
        )
        uncondition = repeat_condition(self.empty_condition, batch_size)
        with torch.no_grad(), self.accelerator.autocast():
            with lora_scale(self.guidance_model, FAKE_ADAPTER, real_scale):
                x0_real = guided_x0(
                    self.guidance_denoiser, noisy_student, noise_level, condition, uncondition, guidance_scale
                )
            with lora_scale(self.guidance_model, FAKE_ADAPTER, config.fake_score_lora_scale):
                x0_fake = self.guidance_denoiser(noisy_student, noise_level, condition)
        return dmd_loss(x0_student, x0_real, x0_fake, sample_weights=sample_weights), guidance_scale

    @torch.no_grad()
    def _reward_tilt(self, final_sample: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """RT-DM weights from the rewards of the full few-step samples (no reward gradient)."""
        with self.accelerator.autocast():
            images = self.decode_for_rewards(final_sample)
            weighted_scores = sum(reward.weight * reward.fn(images, prompts).float() for reward in self.rewards)
        return reward_tilt_weights(weighted_scores, self.config.reward_tilt_temperature)

    @torch.no_grad()
    def _anchor_x0(self, simulation, condition) -> torch.Tensor:
        """The reference student's x0 on the generator's input: the student with its start-of-run weights."""
        with (
            swapped_weights(trainable_parameters(self.student_model), self.anchor_weights),
            self.accelerator.autocast(),
        ):
            return Denoiser(self.student_model, self.family, self.scheduler)(
                simulation.student_input, simulation.noise_level, condition
            )

    @torch.no_grad()
    def _monitor(self, x0_student, images, prompts, condition, rng, generator) -> dict:
        """Reward-hacking monitor: held-out rewards (never trained on) and the frozen teacher's denoising loss on the
        student's samples, which rises when rewards pull samples off the teacher's manifold."""
        with self.accelerator.autocast():
            images = self.decode_for_rewards(x0_student) if images is None else images.detach()
            _, held_out = compute_reward_loss(self.eval_rewards, images, prompts)
        logs = {f"heldout_reward/{name}": score.item() for name, score in held_out.items()}
        logs["monitor/teacher_denoising_loss"] = self._teacher_denoising_loss(x0_student, condition, rng, generator)
        return logs

    @torch.no_grad()
    def _teacher_denoising_loss(self, x0_student, condition, rng, generator) -> float:
        """Denoising loss of the frozen teacher on student samples, at uniform noise levels in [0.02, 0.98]."""
        noise_level = torch.from_numpy(rng.uniform(0.02, 0.98, size=x0_student.shape[0])).float().to(x0_student.device)
        noise = randn_tensor(x0_student.shape, generator=generator, device=x0_student.device, dtype=x0_student.dtype)
        noisy = self.scheduler.add_noise_at(x0_student, noise, noise_level)
        with self.accelerator.autocast(), lora_scale(self.guidance_model, FAKE_ADAPTER, 0.0):
            prediction = self.guidance_denoiser.predict(noisy, noise_level, condition)
        return fake_score_loss(prediction, self.scheduler.training_target(x0_student, noise, noise_level)).item()

    def _schedule_logs(self) -> dict:
        step, config = self.state.global_step, self.config
        alpha, beta = schedules.renoise_beta_params(
            step, config.dynamic_steps, config.renoise_beta_alpha, config.renoise_beta_beta
        )
        return {
            "dg_real_lora_scale": schedules.real_score_lora_scale(
                step, config.dynamic_steps, config.real_score_lora_scale
            ),
            "rs_beta_a": alpha,
            "rs_beta_b": beta,
            "lr": self.student_lr.get_last_lr()[0],
            "stage": 2.0 if step >= config.cold_start_steps else 1.0,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Updates and non-finite guards
    # ------------------------------------------------------------------------------------------------------------
    def _all_finite(self, value: torch.Tensor) -> bool:
        """True when `value` is finite on every process (all processes must agree to skip a step together)."""
        flag = torch.tensor(float(torch.isfinite(value.detach()).all()), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum") / self.accelerator.num_processes
        return bool(flag.item() == 1.0)

    def _apply_update(self, loss, model, optimizer, lr_scheduler, role: str) -> bool:
        if not self._all_finite(loss):
            self._record_nonfinite(role, "loss")
            optimizer.zero_grad(set_to_none=True)
            return False
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(trainable_parameters(model), self.config.max_grad_norm)
        if grad_norm is not None and not self._all_finite(torch.as_tensor(grad_norm)):
            self._record_nonfinite(role, "gradient")
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        setattr(self.state, f"{role}_nonfinite_in_a_row", 0)
        return True

    def _record_nonfinite(self, role: str, what: str) -> None:
        """Count a skipped `role` update (`generator` or `fake`); abort after too many of that role in a row."""
        in_a_row = getattr(self.state, f"{role}_nonfinite_in_a_row") + 1
        setattr(self.state, f"{role}_nonfinite_in_a_row", in_a_row)
        self.state.nonfinite_total += 1
        logger.warning(
            f"Non-finite {role} {what} at generator step {self.state.global_step} (iteration {self.state.iteration}): "
            f"update skipped ({in_a_row} in a row, {self.state.nonfinite_total} in total)."
        )
        if in_a_row >= self.config.max_consecutive_nonfinite_steps:
            raise NonFiniteLossError(
                f"{in_a_row} non-finite {role} losses in a row ({what}); training stopped with the weights unchanged "
                "since the last finite step. Lower --learning_rate / --learning_rate_fake, use --mixed_precision bf16 "
                f"instead of fp16, check the rewards for NaN. {resume_advice(self.last_checkpoint)}"
            )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def _assert_finite_weights(self) -> None:
        for name, model in (("student", self.student_model), ("fake score", self.guidance_model)):
            for parameter in trainable_parameters(model):
                if not torch.isfinite(parameter).all():
                    raise NonFiniteLossError(f"The {name} weights hold NaN/inf: refusing to write a checkpoint.")

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-{step}` atomically (see `checkpointing.atomic_checkpoint_save`); all processes
        must call it. The trainer's counters and history go in as JSON."""
        self._assert_finite_weights()

        def finalize(folder: Path) -> None:
            self.config.save_yaml(folder / CONFIG_FILE)
            save_trainer_state(folder, self.state.state_dict(), self.resumed_history + self.history)

        path = atomic_checkpoint_save(
            self.config.output_dir,
            self.state.global_step,
            lambda folder: self.accelerator.save_state(str(folder)),
            finalize,
            limit=self.config.checkpoints_total_limit,
            is_main_process=self.accelerator.is_main_process,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        self.last_checkpoint = path
        logger.info(f"Saved checkpoint {path}")
        return path

    def load_checkpoint(self, checkpoint: str) -> None:
        path = resolve_checkpoint(self.config.output_dir, checkpoint)
        if path is None:
            logger.warning(f"No complete checkpoint found in {self.config.output_dir}; starting a new run.")
            return
        counters, history = load_trainer_state(path)
        load_accelerator_state_safely(self.accelerator, path)
        self.state.load_state_dict(counters)
        self.resumed_history = history
        self.last_checkpoint = path
        logger.info(f"Resumed from {path} at generator step {self.state.global_step}")

    def _save_model_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                unwrapped = self.accelerator.unwrap_model(model)
                if unwrapped is self._student_module:
                    if self.config.training_mode == "lora":
                        save_file(adapter_state_dict(unwrapped, STUDENT_ADAPTER), Path(output_dir) / STUDENT_LORA_FILE)
                    else:
                        state = {k: v.contiguous() for k, v in unwrapped.state_dict().items()}
                        save_file(state, Path(output_dir) / STUDENT_FULL_FILE)
                elif unwrapped is self._guidance_module:
                    save_file(adapter_state_dict(unwrapped, FAKE_ADAPTER), Path(output_dir) / FAKE_LORA_FILE)
                else:
                    raise ValueError(f"Unexpected model {type(unwrapped).__name__} in the checkpoint.")
        # Every model was written above: accelerate must not save them a second time.
        while weights:
            weights.pop()

    def _load_model_hook(self, models, input_dir) -> None:
        while models:
            unwrapped = self.accelerator.unwrap_model(models.pop())
            if unwrapped is self._student_module:
                if self.config.training_mode == "lora":
                    load_adapter_state_dict(
                        unwrapped, STUDENT_ADAPTER, load_weights_file(Path(input_dir) / STUDENT_LORA_FILE)
                    )
                else:
                    unwrapped.load_state_dict(load_weights_file(Path(input_dir) / STUDENT_FULL_FILE), strict=True)
            elif unwrapped is self._guidance_module:
                load_adapter_state_dict(unwrapped, FAKE_ADAPTER, load_weights_file(Path(input_dir) / FAKE_LORA_FILE))
            else:
                raise ValueError(f"Unexpected model {type(unwrapped).__name__} in the checkpoint.")

    # ------------------------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------------------------
    def log_validation(self) -> Path | None:
        """Sample the validation prompts with fixed seeds, save a PNG grid and log it to the trackers."""
        if not self.accelerator.is_main_process:
            return None
        from .utils import save_image_grid

        prompts = [p for p in self.config.validation_prompts for _ in range(self.config.num_validation_images)]
        generator = torch.Generator("cpu").manual_seed(self.config.seed)
        images = self.decode(self.sample_latents(prompts, generator=generator)).float().cpu()
        path = Path(self.config.output_dir) / "validation" / f"step-{self.state.global_step:06d}.png"
        save_image_grid(images, path, rows=len(self.config.validation_prompts))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images.numpy(), self.state.global_step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {"validation": [wandb.Image(img, caption=p) for img, p in zip(images, prompts, strict=True)]}
                )
        return path
