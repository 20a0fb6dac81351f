"""DMDRTrainer: orchestration of a run (accelerate, processes, accumulation, per-role optimizer steps, TTUR, guards,
checkpoints, validation, logging).

The trainer holds no formula: what an iteration computes is the objective's (`method/objective.py`), which sees the
training module only through its routes. What trains is one [`DMDRTrainingModule`] with one optimizer (a parameter
group per role), prepared by one `accelerator.prepare` call, so DDP and FSDP2 see one model.
"""

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .adapters import STUDENT_ADAPTER, adapter_state_dict
from .callbacks import check_callbacks, run_callbacks
from .checkpointing import (
    CONFIG_FILE,
    atomic_checkpoint_save,
    load_accelerator_state_safely,
    load_objective_state,
    load_trainer_state,
    register_weight_hooks,
    resolve_checkpoint,
    save_objective_state,
    save_trainer_state,
)
from .config import DMDRConfig, report_to_trackers
from .data import PromptSampler
from .families import TeacherComponents
from .families.base import run_student_scheduler
from .guards import DivergenceError, DivergenceGuard, resume_advice, trainable_weight_norm
from .method.denoisers import Denoiser
from .method.objective import MicroBatch, Routes
from .method.registry import make_objective
from .method.simulation import sample_student
from .method.stages import stage_two_start_iteration, stage_values
from .optimization import lr_multiplier, make_optimizer, only_role, set_learning_rates, step_role
from .prompt_cache import PromptEncoder
from .reward_decode import enable_reward_decode_checkpointing, reward_decode_tiling
from .rewards.clip import cache_reward_text_features
from .sharding import (
    check_engine_supported,
    gather_full_state_dict,
    is_fsdp2,
    local_shard,
    student_weights_from_module_state,
)
from .training_module import GUIDANCE_ROLE, STUDENT_ROLE, DMDRTrainingModule, build_training_module
from .utils import log_prompt_truncation_once, resolve_dtype


logger = get_logger(__name__)

# Engines that keep their own (sharded) checkpoint format and gather weights collectively (DeepSpeed is refused).
SHARDED_ENGINES = (DistributedType.FSDP,)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_consecutive_nonfinite_steps` NaN/inf losses in a row."""


def weight_dtype_of(mixed_precision: str | None) -> torch.dtype:
    """The dtype of every frozen tensor for a mixed-precision mode (`fp16`, `bf16`; anything else: float32)."""
    return resolve_dtype(mixed_precision or "no")


@dataclass
class TrainingState:
    """Counters saved with every checkpoint. Random draws and learning rates are functions of `(seed, iteration,
    rank)` and of these counters, so they are all an exact resume needs beyond the weights and optimizer state."""

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
        log_with=report_to_trackers(config.report_to) or None,
        project_config=project,
        # One module, two roles: a fake-score backward leaves the student's parameters without gradients and vice
        # versa, which DDP must be told about.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class DMDRTrainer:
    """Distil `teacher` into a few-step student with DMD, then DMD + rewards (https://huggingface.co/papers/2511.13649).

    Args:
        config ([`DMDRConfig`]): the run's configuration (validated).
        teacher ([`TeacherComponents`]): the loaded teacher pipeline, ideally already in the training dtype
            (`load_teacher(..., dtype=weight_dtype_of(mixed_precision))`); its backbone becomes the frozen base.
        prompts (`list[str]`): the training prompts.
        rewards (`list[LoadedReward]`): rewards of stage 2 (and of RT-DM weighting in stage 1).
        eval_rewards (`list[LoadedReward]`): held-out rewards, logged only (reward-hacking monitor).
        accelerator (`Accelerator`, *optional*): created from `config` when not given.
        reward_vae (`torch.nn.Module`, *optional*): a tiny autoencoder that decodes x0 for the rewards instead of the
            teacher's VAE (validation grids and the export always use the teacher's VAE).
        callbacks (`list`, *optional*): objects with `on_step_end` / `on_checkpoint` methods (see `callbacks.py`).
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
        callbacks: list | None = None,
    ):
        self.config = config
        self.callbacks = check_callbacks(callbacks)
        check_engine_supported(getattr(accelerator, "distributed_type", None))
        self.accelerator = accelerator or create_accelerator(config)
        self.teacher = teacher
        self.family = teacher.family
        self.pipeline = teacher.pipeline
        # A prompt longer than the tokenizer's limit is reported once, not echoed at every step.
        log_prompt_truncation_once(type(self.pipeline).__module__)
        self.state = TrainingState()
        device = self.accelerator.device
        self.weight_dtype = weight_dtype_of(self.accelerator.mixed_precision)
        self.micro_batches = config.gradient_accumulation_steps

        # 1. Frozen parts: the VAE in the mixed-precision dtype (an fp16 VAE that asks for an upcast stays in float32,
        #    as diffusers' SDXL scripts do to avoid NaN decodes); the text encoders go where the prompt encoder says.
        self.vae = teacher.vae.requires_grad_(False).eval()
        vae_upcast = self.weight_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        vae_dtype = torch.float32 if vae_upcast else self.weight_dtype
        self.vae.to(device)
        if self.vae.dtype != vae_dtype:
            self.vae.to(vae_dtype)
        self.reward_vae = self.vae
        if reward_vae is not None:
            self.reward_vae = reward_vae.requires_grad_(False).eval().to(device, self.weight_dtype)
        if config.reward_vae_gradient_checkpointing:
            # Checkpointing acts only with grad enabled: validation and export decodes of a shared VAE are unchanged.
            enable_reward_decode_checkpointing(self.reward_vae)

        # 2. Student grid and sampler.
        self.scheduler = run_student_scheduler(teacher, config)
        # `(C, H, W)`, or `(C, F, H, W)` for video families.
        self.latent_shape = self.family.run_latent_shape(teacher.backbone, self.pipeline, config)

        # 3. What trains: one module over one frozen base (student adapter or full copy; fake adapter).
        module = build_training_module(teacher, config, self.weight_dtype).to(device)
        self.training_module = module

        # 4. One optimizer (a parameter group per role) and one prepare call.
        # The student's LR schedule runs over generator steps, the fake score's over iterations (fake updates).
        schedule, ratio = config.lr_scheduler, config.update_ratio
        self.lr_multipliers = {
            STUDENT_ROLE: lr_multiplier(schedule, config.lr_warmup_steps, config.max_train_steps),
            GUIDANCE_ROLE: lr_multiplier(schedule, config.lr_warmup_steps * ratio, config.max_train_steps * ratio),
        }
        optimizer = make_optimizer(
            {role: module.parameters_of(role) for role in (STUDENT_ROLE, GUIDANCE_ROLE)},
            self._learning_rates(),
            {STUDENT_ROLE: config.adam_weight_decay, GUIDANCE_ROLE: config.adam_weight_decay_fake},
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            use_8bit_adam=config.use_8bit_adam,
        )
        self.model, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.sharded = self.accelerator.distributed_type in SHARDED_ENGINES or is_fsdp2(self.model)
        register_weight_hooks(self.accelerator, module, self.sharded, self.student_state_dict)
        # `self.state` is saved as JSON by `save_checkpoint`, never registered with accelerate (which pickles it).
        self.student_denoiser = Denoiser(partial(self.model, STUDENT_ROLE), self.scheduler)

        # 5. Prompts: the encoder (cached or live), and a resumable sampler over the effective batch (below).
        self.prompt_encoder = PromptEncoder.from_config(config, teacher, self.accelerator, prompts)
        # The real score's unconditional branch: the family's negative prompt (empty, or Qwen-Image's " ").
        self.empty_condition = self.encode([self.family.negative_prompt])
        self.history: list[dict] = []
        # Logs of the steps before a resume (from the checkpoint), so that train_summary.json covers the whole run.
        self.resumed_history: list[dict] = []
        self.last_checkpoint: Path | None = None

        # 6. The method: what each iteration computes, through the training module's routes. Video families score
        #    decoded clips: image rewards per frame on `--reward_frames`, clip rewards whole (`rewards/video.py`).
        if config.cache_reward_text_features:
            # Before the video wrappers: they score through the same reward objects.
            all_rewards = [*(rewards or []), *(eval_rewards or [])]
            cached = cache_reward_text_features(all_rewards, prompts, self.accelerator.autocast)
            logger.info(
                f"--cache_reward_text_features: text features of {len(set(prompts))} prompts cached for "
                f"{cached or 'no reward'} (of {[reward.name for reward in all_rewards]}); their text towers are freed."
            )
        rewards, eval_rewards = self._rewards_for_family(rewards), self._rewards_for_family(eval_rewards)
        routes = Routes(
            student=self.student_denoiser,
            guidance=self.guidance_denoiser,
            student_parameters=lambda: self.unwrapped.parameters_of(STUDENT_ROLE),
            real_score_x0=self.family.real_score_x0,
            encode=self.encode,
            uncondition=self.empty_condition,
            initial_noise=self.initial_noise,
            decode=self.decode_for_rewards,
            rewards=rewards,
            eval_rewards=eval_rewards,
            autocast=self.accelerator.autocast,
            fake_condition=self.fake_condition,
        )
        # The objective `--rl` names (`method.registry.OBJECTIVES`): DMDR with ReFL, GRPO or DPO in stage 2.
        self.objective = make_objective(config.rl, config, routes)
        # The prompt stream switches to the stage-2 batch at the first iteration of stage 2 (TTUR: the objective's ratio).
        self.prompt_sampler = PromptSampler(
            prompts,
            config.train_batch_size * self.micro_batches,
            config.seed,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            stage2_batch_size=stage_values(config, config.cold_start_steps).train_batch_size * self.micro_batches,
            stage2_start_iteration=stage_two_start_iteration(config.cold_start_steps, self.objective.update_ratio),
        )

    def _learning_rates(self) -> dict[str, float]:
        # The base rates are those of the current stage (`--stage2_*` from the cold start on), times the schedule.
        stage = stage_values(self.config, self.state.global_step)
        return {
            STUDENT_ROLE: stage.learning_rate * self.lr_multipliers[STUDENT_ROLE](self.state.global_step),
            GUIDANCE_ROLE: stage.learning_rate_fake * self.lr_multipliers[GUIDANCE_ROLE](self.state.iteration),
        }

    @property
    def rewards(self) -> list:
        """The trained rewards, as the objective reads them (assigning replaces them for the next steps)."""
        return self.objective.routes.rewards

    @rewards.setter
    def rewards(self, rewards: list) -> None:
        self.objective.routes.rewards = self._rewards_for_family(rewards)

    def _rewards_for_family(self, rewards: list | None) -> list:
        rewards = list(rewards or [])
        if not self.family.is_video:
            return rewards
        from .rewards.video import video_rewards

        return video_rewards(rewards, self.config.reward_frames)

    @property
    def unwrapped(self) -> DMDRTrainingModule:
        return self.training_module

    @property
    def student_model(self) -> torch.nn.Module:
        """The student backbone (LoRA mode: the shared base, which also carries the `fake` adapter)."""
        module = self.training_module
        return module.student_backbone if module.is_full else module.backbone

    @property
    def guidance_model(self) -> torch.nn.Module:
        """The shared base with the `fake` adapter (the real score at multiplier 0 is the teacher)."""
        return self.training_module.backbone

    def guidance_denoiser(self, lora_scale: float) -> Denoiser:
        """The guidance network at fake-adapter multiplier `lora_scale` (0: the teacher) as an x0 denoiser."""
        return Denoiser(partial(self.model, GUIDANCE_ROLE, lora_scale=lora_scale), self.scheduler)

    def encode(self, prompts: list[str]) -> dict:
        # Guidance-distilled families (FLUX.1) condition the student and the fake score on a fixed guidance embedding.
        condition = self.prompt_encoder.encode(prompts)
        return self.family.with_guidance_embedding(condition, self.config.guidance_embedding_scale)

    def fake_condition(self, condition: dict) -> dict:
        # FLUX.1 [dev]: the fake score may run at its own guidance embedding (`--fake_guidance_scale`).
        scale = self.config.fake_guidance_scale
        if scale is None or scale == self.config.guidance_embedding_scale:
            return condition
        return self.family.with_guidance_embedding(condition, scale)

    def initial_noise(self, batch_size: int, generator) -> torch.Tensor:
        shape = (batch_size, *self.latent_shape)
        return randn_tensor(shape, generator=generator, device=self.accelerator.device, dtype=torch.float32)

    @torch.no_grad()
    def sample_latents(
        self, prompts: list[str], generator: torch.Generator | None = None, initial_noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The student's N-step sampler (the exported pipeline reproduces it for the same generator)."""
        condition = self.encode(prompts)
        noise = self.initial_noise(len(prompts), generator) if initial_noise is None else initial_noise
        with self.accelerator.autocast():
            predictions = sample_student(
                lambda sample, level: self.student_denoiser(sample, level, condition),
                noise,
                self.scheduler,
                deterministic=self.scheduler.config.deterministic,
                generator=generator,
                # Re-noising noise in the layout the stock pipeline's scheduler steps on (FLUX, Qwen-Image: packed tokens).
                noise_fn=self.family.step_noise,
            )
        return predictions[-1].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.decode(self.vae, latents)

    def decode_for_rewards(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable decode on the reward path (the tiny autoencoder when one is given).

        The decode runs in the autoencoder's own weight dtype with autocast off, although the objective calls it
        inside the mixed-precision context: CUDA autocast computes `group_norm` in float32, which doubles the
        normalised activations a full VAE keeps for the reward backward (+9 GiB on SDXL at 1024 px), and under fp16
        autocast would run an upcast (`force_upcast`) VAE's convolutions in fp16 after all. A float32 run (no
        autocast) is unchanged bit for bit.
        """
        tile_size = self.config.reward_vae_tile_size
        with torch.autocast(latents.device.type, enabled=False), reward_decode_tiling(self.reward_vae, tile_size):
            return self.family.decode(self.reward_vae, latents)

    def train(self) -> list[dict]:
        """Run until `max_train_steps` generator updates; returns the per-step logs."""
        config = self.config
        if config.resume_from_checkpoint:
            self.load_checkpoint(config.resume_from_checkpoint)
        # A frozen reference (the anchor) is the student as this run starts, after any resume.
        self.objective.begin_run()
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
            batches = self.rollout(self.state.iteration)
            if GUIDANCE_ROLE in self.objective.trained_roles:
                fake_logs = self._update(GUIDANCE_ROLE, batches, self.objective.fake_score_loss)
                if not fake_logs["step_skipped"]:
                    fake_losses.append(fake_logs["loss_fake"])
            self.state.iteration += 1
            # TTUR: the generator updates after every `update_ratio`-th iteration, on that iteration's batches.
            if self.state.iteration % self.objective.update_ratio:
                continue
            logs = self._generator_update(batches)
            logs["loss_fake"] = float(np.mean(fake_losses)) if fake_losses else float("nan")
            logs = self._mean_over_processes(logs)
            fake_losses = []
            logs.update(self._schedule_logs())
            self.state.global_step += 1
            logs["nonfinite_steps"] = self.state.nonfinite_total
            self.history.append({"step": self.state.global_step, **logs})
            run_callbacks(self.callbacks, "on_step_end", self, step=self.state.global_step, logs=self.history[-1])
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
        # Not `accelerator.end_training()`: it destroys the process group, which the export still needs (sharded
        # engines gather the weights collectively). The script ends the run after exporting.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return self.history

    def rollout(self, iteration: int) -> list[MicroBatch]:
        """The objective's training inputs of `iteration` on this process, split into the micro-batches."""
        prompts = self.prompt_sampler.batch(iteration)
        first_row = self.accelerator.process_index * len(prompts)
        return self.objective.rollout(iteration, self.state.global_step, prompts, first_row, self.micro_batches)

    def _update(self, role: str, batches: list[MicroBatch], loss_fn) -> dict:
        """One optimizer step of `role`: its loss accumulated over the micro-batches, then clipped and stepped.
        Returns the logs averaged over the micro-batches and `step_skipped` (1.0 after a non-finite loss or
        gradient: then the logs are those of the last micro-batch computed)."""
        self.objective.before_update(role, self.state.global_step)
        scale, rows = self.objective.lora_scale_of(role), []
        for index, batch in enumerate(batches):
            self.model.train()
            loss, logs = loss_fn(batch, self.state.global_step)
            rows.append(logs)
            if not self._backward(loss, role, scale, last=index + 1 == len(batches)):
                return {**logs, "step_skipped": 1.0}
        stepped = self._step(role)
        return {
            **{key: float(np.mean([row[key] for row in rows])) for key in rows[0]},
            "step_skipped": float(not stepped),
        }

    def _generator_update(self, batches: list[MicroBatch]) -> dict:
        """The student's update(s) on one iteration's batches: `objective.generator_updates_per_rollout` optimizer
        steps (several are PPO-style inner epochs on the same rollouts), logs averaged over them; it stops at a
        skipped step, whose logs it returns."""
        count = self.objective.generator_updates_per_rollout(self.state.global_step)
        rows = []
        for _ in range(count):
            rows.append(self._update(STUDENT_ROLE, batches, self.objective.generator_loss))
            if rows[-1]["step_skipped"]:
                return rows[-1]
        if count == 1:
            return rows[0]
        return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}

    def _mean_over_processes(self, logs: dict) -> dict:
        """Logged values averaged over the processes: the losses of the global batch, the same on every process (so
        the guards decide alike everywhere), and equal to a one-process run's on the same global batch."""
        if self.accelerator.num_processes == 1:
            return logs
        keys = sorted(logs)
        values = torch.tensor([float(logs[key]) for key in keys], dtype=torch.float64, device=self.accelerator.device)
        means = self.accelerator.reduce(values, reduction="mean").tolist()
        return dict(zip(keys, means, strict=True))

    def _schedule_logs(self) -> dict:
        step, learning_rates = self.state.global_step, self._learning_rates()
        return {
            **self.objective.schedule_logs(step),
            "lr": learning_rates[STUDENT_ROLE],
            "lr_fake": learning_rates[GUIDANCE_ROLE],
            "stage": float(stage_values(self.config, step).stage),
        }

    def _weight_norms(self) -> dict[str, float]:
        return {
            name: trainable_weight_norm(self.unwrapped.parameters_of(role))
            for name, role in (("student", STUDENT_ROLE), ("fake score", GUIDANCE_ROLE))
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
                p.detach().double().sum()
                for role in (STUDENT_ROLE, GUIDANCE_ROLE)
                for p in self.unwrapped.parameters_of(role)
            ]
        ).sum()
        return self.accelerator.gather(local[None].to(self.accelerator.device)).cpu().tolist()

    def _write_summary(self) -> None:
        """`output_dir/train_summary.json`: what ran (processes, steps, skipped steps, replica agreement, last logs)."""
        # Sharded engines hold different shards per process: only replicated weights can be compared.
        checksums = None if self.sharded else self._replica_checksums()
        if not self.accelerator.is_main_process:
            return
        summary = {
            "num_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "gradient_accumulation_steps": self.micro_batches,
            "global_step": self.state.global_step,
            "iterations": self.state.iteration,
            "nonfinite_steps": self.state.nonfinite_total,
            "replica_checksums": checksums,
            "replicas_identical": None if checksums is None else all(row == checksums[0] for row in checksums),
            "student_timesteps": list(self.scheduler.config.training_timesteps),
            "history": self.resumed_history + self.history,
        }
        path = Path(self.config.output_dir) / "train_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2), encoding="utf-8")

    def _all_finite(self, value: torch.Tensor) -> bool:
        """True when `value` is finite on every process (all processes must agree to skip a step together)."""
        flag = torch.tensor(float(torch.isfinite(value.detach()).all()), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum") / self.accelerator.num_processes
        return bool(flag.item() == 1.0)

    def _backward(self, loss: torch.Tensor, role: str, lora_scale: float, last: bool) -> bool:
        """Accumulate `loss / micro_batches` into `role`'s gradients; False (and gradients cleared) when non-finite.

        Gradients are synchronised across processes on the last micro-batch only. Only `role`'s group has a nonzero
        learning rate from here to its step (`optimization.step_role`).
        """
        if not self._all_finite(loss):
            self._record_nonfinite(role, "loss")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        # Gradient checkpointing recomputes the forward during backward with the adapters routed as they are now.
        self.unwrapped.route(role, lora_scale)
        set_learning_rates(self.optimizer, only_role(self._learning_rates(), role))
        self.accelerator.sync_gradients = last
        with nullcontext() if last else self.accelerator.no_sync(self.model):
            self.accelerator.backward(loss / self.micro_batches)
        self.accelerator.sync_gradients = True
        return True

    def _step(self, role: str) -> bool:
        """Clip `role`'s gradients and step its parameter group; False (update skipped) on non-finite gradients."""
        grad_norm = self.accelerator.clip_grad_norm_(self.unwrapped.parameters_of(role), self.config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        if grad_norm is not None and not self._all_finite(torch.as_tensor(grad_norm)):
            self._record_nonfinite(role, "gradient")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        step_role(self.optimizer, role, self._learning_rates())
        setattr(self.state, f"{NONFINITE_COUNTER_NAMES[role]}_nonfinite_in_a_row", 0)
        return True

    def _record_nonfinite(self, role: str, what: str) -> None:
        """Count a skipped update of `role`; abort after too many of that role in a row."""
        role = NONFINITE_COUNTER_NAMES[role]
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

    def _assert_finite_weights(self) -> None:
        """Refuse to checkpoint NaN/inf weights; sharded engines check each shard and agree across processes."""
        for role, name in ((STUDENT_ROLE, "student"), (GUIDANCE_ROLE, "fake score")):
            local = [local_shard(p) for p in self.unwrapped.parameters_of(role)]
            finite = all(bool(torch.isfinite(tensor).all()) for tensor in local)
            if not self._all_finite(torch.tensor(0.0 if finite else float("nan"))):
                raise NonFiniteLossError(f"The {name} weights hold NaN/inf: refusing to write a checkpoint.")

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-{step}` atomically (see `checkpointing.atomic_checkpoint_save`); all processes
        must call it (under FSDP each writes its shard into the same temporary folder). The trainer's
        counters and history go in as JSON."""
        self._assert_finite_weights()

        def finalize(folder: Path) -> None:
            self.config.save_yaml(folder / CONFIG_FILE)
            save_trainer_state(folder, self.state.state_dict(), self.resumed_history + self.history, self.run_facts())

        path = atomic_checkpoint_save(
            self.config.output_dir,
            self.state.global_step,
            self._write_state,
            finalize,
            limit=self.config.checkpoints_total_limit,
            is_main_process=self.accelerator.is_main_process,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        self.last_checkpoint = path
        logger.info(f"Saved checkpoint {path}")
        run_callbacks(self.callbacks, "on_checkpoint", self, step=self.state.global_step, path=path)
        return path

    def run_facts(self) -> dict:
        """What a resume must find unchanged beyond the recipe (`preflight.check_resume_recipe` compares them)."""
        return {
            "family": self.family.name,
            "student_timesteps": [float(t) for t in self.scheduler.config.training_timesteps],
            "num_processes": self.accelerator.num_processes,
        }

    def _write_state(self, folder: Path) -> None:
        """Every process: the engine's state, and the objective's (e.g. a frozen reference; this process's shards)."""
        self.accelerator.save_state(str(folder))
        save_objective_state(folder, self.accelerator.process_index, self.objective.state_dict())

    def load_checkpoint(self, checkpoint: str) -> None:
        path = resolve_checkpoint(self.config.output_dir, checkpoint, check_weights=True)
        if path is None:
            logger.warning(f"No complete checkpoint found in {self.config.output_dir}; starting a new run.")
            return
        counters, history = load_trainer_state(path)
        load_accelerator_state_safely(self.accelerator, path)
        self.state.load_state_dict(counters)
        self.objective.load_state_dict(load_objective_state(path, self.accelerator.process_index))
        self.resumed_history = history
        self.last_checkpoint = path
        logger.info(f"Resumed from {path} at generator step {self.state.global_step}")

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's weights: PEFT-format LoRA (LoRA mode) or the full backbone state dict, whatever the engine.

        Under FSDP the full state dict is gathered, so every process must call this.
        """
        if self.sharded:
            return student_weights_from_module_state(
                gather_full_state_dict(self.accelerator, self.model), full=self.training_module.is_full
            )
        module = self.training_module
        if module.is_full:
            return {k: v.detach().contiguous() for k, v in module.student_backbone.state_dict().items()}
        return adapter_state_dict(module.backbone, STUDENT_ADAPTER)

    def log_validation(self) -> Path | None:
        """Sample the validation prompts with fixed seeds, save a PNG grid and log it to the trackers.

        Sharded engines need every process in each forward pass, so all of them sample; the main one writes.
        """
        if not self.accelerator.is_main_process and not self.sharded:
            return None
        from .utils import save_image_grid

        prompts = [p for p in self.config.validation_prompts for _ in range(self.config.num_validation_images)]
        generator = torch.Generator("cpu").manual_seed(self.config.seed)
        images = self.decode(self.sample_latents(prompts, generator=generator)).float().cpu()
        if not self.accelerator.is_main_process:
            return None
        rows = len(self.config.validation_prompts)
        if images.ndim == 5:
            # Video families: the clips as an animated GIF grid; the trackers get each clip's first frame.
            from .video_io import save_video_grid

            path = Path(self.config.output_dir) / "validation" / f"step-{self.state.global_step:06d}.gif"
            save_video_grid(images, path, rows=rows)
            images = images[:, :, 0]
        else:
            path = Path(self.config.output_dir) / "validation" / f"step-{self.state.global_step:06d}.png"
            save_image_grid(images, path, rows=rows, row_captions=self.config.validation_prompts)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images.numpy(), self.state.global_step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {"validation": [wandb.Image(img, caption=p) for img, p in zip(images, prompts, strict=True)]}
                )
        return path


# The non-finite counters of `TrainingState` speak of the generator and the fake score.
NONFINITE_COUNTER_NAMES = {STUDENT_ROLE: "generator", GUIDANCE_ROLE: "fake"}
