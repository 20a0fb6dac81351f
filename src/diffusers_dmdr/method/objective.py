"""The training objective: what one iteration of a method computes from the training module's routes and a batch.

An [`Objective`] makes the iteration's training inputs (`rollout`) and the loss of each role it trains, with the
values to log. It knows nothing of accelerate, optimizers, checkpoints or logging: [`~trainer.DMDRTrainer`] runs it
(backward passes, accumulation, per-role optimizer steps, guards, checkpoints) in this order:

    batches = objective.rollout(iteration, global_step, prompts, first_row, micro_batches)
    if GUIDANCE_ROLE in objective.trained_roles:   # every iteration: before_update, then per micro-batch
        loss, logs = objective.fake_score_loss(batch, global_step)
    after every `objective.update_ratio`-th iteration (TTUR): before_update, then per micro-batch
        loss, logs = objective.generator_loss(batch, global_step)

[`DMDRObjective`] (`"refl"`) is DMDR as the paper trains it: DMD with DynaRS / DynaDG, reward back-propagation in
stage 2 (hinge, linear or relative rewards), RT-DM tilting in stage 1, the optional L2 anchor, the monitors.

Further objectives plug in as subclasses, registered in `method.registry.OBJECTIVES`: GRPO and DPO (`method/rl.py`)
keep DMDR's stage 1 and, in stage 2, return grouped, scored rollouts from `rollout` and carry a frozen reference (the
stage-1 student) in `state_dict`, which the trainer saves with every checkpoint. Several optimizer steps on one
rollout is what the trainer's loop does not offer: each rollout gets one generator update (on-policy).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..adapters import swapped_weights
from ..rewards import compute_reward_loss, compute_reward_loss_sequentially, set_reward_step
from ..training_module import GUIDANCE_ROLE, STUDENT_ROLE
from . import schedules
from .denoisers import Denoiser, repeat_condition
from .draws import IterationDraws, draw_iteration
from .losses import anchor_loss, dmd_loss, fake_score_loss, reward_tilt_weights
from .simulation import SimulationOutput, backward_simulation


@dataclass
class Routes:
    """What an objective may call, bound by the trainer to the prepared training module (so the engine's hooks see
    every forward pass) and the frozen parts around it."""

    student: Denoiser  # (x_t, t, condition) -> x0 with the graph; its `scheduler` holds the student grid
    guidance: Callable[[float], Denoiser]  # at a fake-adapter multiplier: fake score, DynaDG real score, 0 = teacher
    student_parameters: Callable[[], list[torch.nn.Parameter]]  # the student's trainable weights
    real_score_x0: Callable[..., torch.Tensor]  # the family's CFG rule: (denoiser, x_t, t, cond, uncond, scale) -> x0
    encode: Callable[[list[str]], dict]  # prompts -> the backbone's conditioning
    uncondition: dict  # the conditioning of the family's negative prompt, batch 1
    initial_noise: Callable[[int, list[torch.Generator]], torch.Tensor]  # (batch size, generators) -> latent noise
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [0, 1], differentiable (reward path)
    rewards: list  # trained rewards (`LoadedReward`)
    eval_rewards: list  # held-out rewards, logged only
    autocast: Callable[[], AbstractContextManager]  # the mixed-precision context of every forward pass
    # The fake score's conditioning from the student's (FLUX.1 [dev]: another guidance embedding); default: the same.
    fake_condition: Callable[[dict], dict] = lambda condition: condition


@dataclass
class MicroBatch:
    """One micro-batch: prompts, conditioning, its rows of the iteration's draws, its backward simulation."""

    prompts: list[str]
    condition: dict
    draws: IterationDraws
    simulation: SimulationOutput


class Objective(ABC):
    """A training method, built from the run's config and the training module's routes."""

    name: str
    # The roles it updates, and TTUR: rollouts (and fake-score updates) per generator update.
    trained_roles: tuple[str, ...] = (STUDENT_ROLE,)
    update_ratio: int = 1

    def __init__(self, config, routes: Routes):
        self.config = config
        self.routes = routes

    def lora_scale_of(self, role: str) -> float:
        """The fake-adapter multiplier of `role`'s loss route (the trainer routes the module so again before
        `backward`, where gradient checkpointing recomputes the forward pass)."""
        return 1.0

    def begin_run(self) -> None:
        """Called once as a run starts, after any resume."""
        return None

    def before_update(self, role: str, global_step: int) -> None:
        """Called before the micro-batches of each update of `role`."""
        return None

    def generator_updates_per_rollout(self, global_step: int) -> int:
        """Optimizer steps of the student on the batches of generator step `global_step` (PPO-style inner epochs of
        the RL objectives; 1 for everything else)."""
        return 1

    def schedule_logs(self, global_step: int) -> dict[str, float]:
        """Progress-dependent values to log after generator step `global_step`."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the objective must carry across a resume (e.g. a frozen reference); saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` from a checkpoint (called before `begin_run`)."""
        return None

    @abstractmethod
    def rollout(
        self, iteration: int, global_step: int, prompts: list[str], first_row: int, micro_batches: int
    ) -> list[MicroBatch]:
        """The inputs of `iteration`: `prompts` are this process's rows `first_row ..` of the global batch."""

    def fake_score_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The fake score's loss on `batch` and its logs. The trainer calls it only for objectives whose
        `trained_roles` include the guidance network; one that trains the student alone keeps this default, which
        says so if it is ever called."""
        raise NotImplementedError(f"The {self.name!r} objective trains no fake score.")

    @abstractmethod
    def generator_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's loss on `batch` and its logs (`loss`: the total)."""


class DMDRObjective(Objective):
    """DMDR (https://huggingface.co/papers/2511.13649): DMD regularises reward back-propagation.

    Rollout: every sample's backward simulation (the student's own sampler without gradients, stopped at a drawn
    step). Fake score: plain denoising loss on the detached samples at DynaRS levels. Generator: the normalised DMD
    direction between the real score (teacher with jittered CFG; the fake adapter at the DynaDG multiplier) and the
    fake score, RT-DM-tilted per sample in stage 1 when `reward_tilt`, plus the weighted reward losses on the decoded
    one-step prediction from `cold_start_steps` on, plus the L2 anchor to the student as the run started.
    """

    name = "refl"

    def __init__(self, config, routes: Routes):
        super().__init__(config, routes)
        self.scheduler = routes.student.scheduler
        # The scheduler is deterministic exactly when the run's backward simulation is `ode`.
        self.simulation_mode = "ode" if self.scheduler.config.deterministic else "sde"
        self.anchor_weights: list[torch.Tensor] | None = None
        self.update_ratio = config.update_ratio
        # With DMD switched off (reward-only ablations) the fake score has no reader: it is not trained.
        self.trained_roles = (STUDENT_ROLE, GUIDANCE_ROLE) if config.dmd_loss_weight > 0 else (STUDENT_ROLE,)

    def lora_scale_of(self, role: str) -> float:
        return self.config.fake_score_lora_scale if role == GUIDANCE_ROLE else 1.0

    def begin_run(self) -> None:
        if self.config.anchor_loss_weight > 0:
            self.anchor_weights = [p.detach().clone() for p in self.routes.student_parameters()]

    def before_update(self, role: str, global_step: int) -> None:
        if role == STUDENT_ROLE:
            # Relative rewards draw their control words from `(seed, step, call within the step)`.
            set_reward_step(self.routes.rewards + self.routes.eval_rewards, global_step)

    def schedule_logs(self, global_step: int) -> dict[str, float]:
        config = self.config
        alpha, beta = schedules.renoise_beta_params(
            global_step, config.dynamic_steps, config.renoise_beta_alpha, config.renoise_beta_beta
        )
        scale = schedules.real_score_lora_scale(global_step, config.dynamic_steps, config.real_score_lora_scale)
        return {"dg_real_lora_scale": scale, "rs_beta_a": alpha, "rs_beta_b": beta}

    def rollout(
        self, iteration: int, global_step: int, prompts: list[str], first_row: int, micro_batches: int
    ) -> list[MicroBatch]:
        """Every sample's backward simulation, from the iteration's draws (`draws.py`)."""
        draws = self.draws(iteration, global_step, first_row, len(prompts))
        size, batches = len(prompts) // micro_batches, []
        for index in range(micro_batches):
            rows = slice(index * size, (index + 1) * size)
            condition, batch_draws = self.routes.encode(prompts[rows]), draws.rows(rows)
            with self.routes.autocast():
                simulation = backward_simulation(
                    lambda sample, level, condition=condition: self.routes.student(sample, level, condition),
                    self.routes.initial_noise(size, batch_draws.generators),
                    self.scheduler,
                    self.simulation_mode,
                    batch_draws.generators,
                    torch.from_numpy(batch_draws.step_index),
                )
            batches.append(MicroBatch(prompts[rows], condition, batch_draws, simulation))
        return batches

    def draws(self, iteration: int, global_step: int, first_row: int, rows: int) -> IterationDraws:
        """Every random number of `iteration` for the rows `first_row ..` of its global batch (`draws.py`)."""
        config = self.config
        return draw_iteration(
            config.seed,
            iteration,
            first_row=first_row,
            rows=rows,
            num_student_steps=len(self.scheduler.noise_levels),
            renoise_beta=schedules.renoise_beta_params(
                global_step, config.dynamic_steps, config.renoise_beta_alpha, config.renoise_beta_beta
            ),
            guidance_scale=config.real_guidance_scale,
            guidance_scale_jitter=config.guidance_scale_jitter,
        )

    def fake_score_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Denoising loss of the fake score on the detached student sample at the DynaRS levels."""
        loss = self._denoising_loss(
            batch.simulation.clean_sample,
            batch.draws.fake_noise_levels,
            batch,
            self.config.fake_score_lora_scale,
            self.routes.fake_condition(batch.condition),
        )
        return loss, {"loss_fake": loss.item()}

    def generator_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD (RT-DM-tilted in stage 1), the anchor, and the rewards in stage 2, on the student's one-step x0."""
        config, routes, simulation, logs = self.config, self.routes, batch.simulation, {}
        in_stage_two = global_step >= config.cold_start_steps
        # The anchor swaps weights in place, so it must run before the student's graph is built.
        x0_anchor = None if self.anchor_weights is None else self._anchor_x0(simulation, batch.condition)
        with routes.autocast():
            x0_student = routes.student(simulation.student_input, simulation.noise_level, batch.condition)
        loss = torch.zeros((), device=x0_student.device)
        if config.dmd_loss_weight > 0:
            sample_weights = None
            if config.reward_tilt and not in_stage_two:
                sample_weights = self._reward_tilt(simulation.final_sample, batch.prompts)
            loss_dmd = self.dmd_loss(x0_student, batch, global_step, sample_weights)
            loss = loss + config.dmd_loss_weight * loss_dmd
            logs.update(loss_dmd=loss_dmd.item(), real_guidance_scale=batch.draws.guidance_scale)
        if x0_anchor is not None:
            loss_anchor = anchor_loss(x0_student, x0_anchor)
            loss = loss + config.anchor_loss_weight * loss_anchor
            logs["loss_anchor"] = loss_anchor.item()
        images = None
        if in_stage_two and routes.rewards and config.sequential_reward_backward:
            with routes.autocast():
                images = routes.decode(x0_student)
                _refuse_fp16_autocast(images.device.type)
            # Each reward's backward runs now, freeing its tower before the next; the trainer's backward carries
            # the summed image gradient through the decode and the student.
            loss_rl, scores = compute_reward_loss_sequentially(routes.rewards, images, batch.prompts, routes.autocast)
            loss = loss + loss_rl
            logs["loss_rl"] = loss_rl.item()
            logs.update({f"reward/{name}": score.item() for name, score in scores.items()})
        elif in_stage_two and routes.rewards:
            with routes.autocast():
                images = routes.decode(x0_student)
                loss_rl, scores = compute_reward_loss(routes.rewards, images, batch.prompts)
            loss = loss + loss_rl
            logs["loss_rl"] = loss_rl.item()
            logs.update({f"reward/{name}": score.item() for name, score in scores.items()})
        if routes.eval_rewards:
            logs.update(self._monitor(x0_student.detach(), images, batch))
        logs["loss"] = loss.item()
        return loss, logs

    def dmd_loss(
        self,
        x0_student: torch.Tensor,
        batch: MicroBatch,
        global_step: int,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Re-noise the student's x0 at a DynaRS level, query the real score (DynaDG scale, jittered CFG) and the fake
        score without gradient, and form the normalised DMD surrogate."""
        config, routes = self.config, self.routes
        noise_level = batch.draws.dmd_noise_levels.to(x0_student.device)
        noise = self._noise_like(x0_student, batch)
        noisy_student = self.scheduler.add_noise_at(x0_student.detach(), noise, noise_level)
        real_scale = schedules.real_score_lora_scale(global_step, config.dynamic_steps, config.real_score_lora_scale)
        uncondition = repeat_condition(routes.uncondition, x0_student.shape[0])
        with torch.no_grad(), routes.autocast():
            # Two-pass CFG by the family's stock rule (Qwen-Image rescales the guided velocity per token), or one pass
            # at a guidance embedding for guidance-distilled families (FLUX.1 [dev]).
            x0_real = routes.real_score_x0(
                routes.guidance(real_scale),
                noisy_student,
                noise_level,
                batch.condition,
                uncondition,
                batch.draws.guidance_scale,
            )
            # The fake score is queried under the conditioning it is trained on (FLUX.1: its own guidance embedding).
            fake_condition = routes.fake_condition(batch.condition)
            x0_fake = routes.guidance(config.fake_score_lora_scale)(noisy_student, noise_level, fake_condition)
        return dmd_loss(x0_student, x0_real, x0_fake, sample_weights=sample_weights)

    def _noise_like(self, tensor: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        return randn_tensor(tensor.shape, generator=batch.draws.generators, device=tensor.device, dtype=tensor.dtype)

    def _denoising_loss(
        self, clean_sample, noise_level, batch: MicroBatch, lora_scale: float, condition: dict | None = None
    ) -> torch.Tensor:
        """The guidance route's denoising loss on `clean_sample` noised to `noise_level` with the samples' noise,
        under `condition` (default: the batch's)."""
        noise_level = noise_level.to(clean_sample.device)
        noise = self._noise_like(clean_sample, batch)
        noisy_sample = self.scheduler.add_noise_at(clean_sample, noise, noise_level)
        target = self.scheduler.training_target(clean_sample, noise, noise_level)
        with self.routes.autocast():
            prediction = self.routes.guidance(lora_scale).predict(
                noisy_sample, noise_level, batch.condition if condition is None else condition
            )
        return fake_score_loss(prediction, target)

    @torch.no_grad()
    def _reward_tilt(self, final_sample: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """RT-DM weights from the rewards of the full few-step samples (no reward gradient), z-scored within the
        micro-batch (the config refuses a micro-batch of 1)."""
        with self.routes.autocast():
            images = self.routes.decode(final_sample)
            weighted_scores = sum(reward.weight * reward.fn(images, prompts).float() for reward in self.routes.rewards)
        return reward_tilt_weights(weighted_scores, self.config.reward_tilt_strength)

    @torch.no_grad()
    def _anchor_x0(self, simulation: SimulationOutput, condition: dict) -> torch.Tensor:
        """The reference student's x0 on the generator's input: the student with its start-of-run weights."""
        with swapped_weights(self.routes.student_parameters(), self.anchor_weights), self.routes.autocast():
            return self.routes.student(simulation.student_input, simulation.noise_level, condition)

    @torch.no_grad()
    def _monitor(self, x0_student: torch.Tensor, images: torch.Tensor | None, batch: MicroBatch) -> dict[str, float]:
        """Reward-hacking monitor: held-out rewards (never trained on) and the frozen teacher's denoising loss on the
        student's samples (at uniform levels in [0.02, 0.98]), which rises when rewards pull samples off the
        teacher's manifold."""
        with self.routes.autocast():
            images = self.routes.decode(x0_student) if images is None else images.detach()
            _, held_out = compute_reward_loss(self.routes.eval_rewards, images, batch.prompts)
        logs = {f"heldout_reward/{name}": score.item() for name, score in held_out.items()}
        teacher_loss = self._denoising_loss(x0_student, batch.draws.monitor_noise_levels, batch, lora_scale=0.0)
        return {**logs, "monitor/teacher_denoising_loss": teacher_loss.item()}


def _refuse_fp16_autocast(device_type: str) -> None:
    """`--sequential_reward_backward` runs the reward towers' backward outside the fp16 loss scaler (the config
    refuses `--mixed_precision fp16`; this catches fp16 from accelerate's own config)."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        raise ValueError(
            "--sequential_reward_backward runs the reward towers' backward outside fp16's loss scaling, where their "
            "small gradients underflow: use mixed precision bf16 (or no), or drop --sequential_reward_backward."
        )
