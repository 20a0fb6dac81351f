"""RL from rewards without gradients, regularised by DMD: the GRPO (`--rl grpo`) and DPO (`--rl dpo`) objectives.

Reward back-propagation (`--rl refl`, [`DMDRObjective`]) needs a differentiable reward. These objectives need only
scores: a reward may be a scikit-learn model, an OCR service or a VLM judge behind HTTP (`rewards/scores.py`). Both
run DMDR's two stages unchanged in stage 1 (the DMD cold start is the `refl` objective's, draw for draw), and in
stage 2 replace the reward-gradient term with a policy objective on the student's own rollouts:

- **rollout** (on the iterations that end in a generator update; the others are DMDR's backward simulation, which
  the fake score trains on): each micro-batch holds whole groups of `rl_group_size` rows that share one prompt; every
  row runs the student's stochastic sampler from its own noise (the `sde` sampler as trained, or for `ode` students
  the coefficients-preserving variant at `rl_noise_level`, see `method/policy.py`), recording the states; the final
  samples are decoded and scored without gradients, `reward = sum_j weight_j * score_j`.
- **GRPO**: group-normalised, clipped advantages; each row trains one transition of its trajectory, the state at
  its drawn student step `i` (the iteration's `step_index`; a row drawn at the last step, which has no stochastic
  transition, trains DMD only), through the PPO-clipped ratio of the transition's Gaussian log-probability (Flow-GRPO,
  Liu et al. 2025, arXiv 2505.05470; DanceGRPO, Xue et al. 2025, arXiv 2505.07818). `rl_inner_epochs` > 1 makes
  several optimizer steps on one rollout (Flow-GRPO's `num_inner_epochs`): the ratio is taken against the
  log-probability of the student that drew the rollout, so from the second step on it moves off 1 and is clipped.
- **DPO**: the best and the worst of each group (ranked by reward) form an on-policy pair; the Diffusion-DPO loss
  (Wallace et al. 2023) compares the student's x0 errors on both, noised at the winner's drawn student level with
  one shared noise, with those of the reference (the stage-1 student).
- **regulariser** (`rl_regularizer`): `dmd` adds DMDR's DMD loss on the same student prediction (the DMDR authors'
  proposal: the DMD loss in place of GRPO's KL, DMDR, arXiv 2511.13649; Z-Image's RL stages after its
  step distillation used distribution matching the same way); `kl` adds Flow-GRPO's KL between the student's and the
  reference's transitions (GRPO only: DPO's reference is built into its loss); `none` is the bare RL objective. The
  fake score keeps training in every arm, so the arms run the same number of rollouts and generator steps.

Total loss in stage 2: `dmd_loss_weight * L_DMD [dmd] + rl_weight * L_RL + rl_kl_weight * KL [kl, GRPO]`.

The reference (stage-1 student) is the student's weights when stage 2 starts; it is part of the objective's state,
saved with every checkpoint, so a run resumed mid-stage-2 compares against the same reference. Every random number is
a function of `(seed, iteration, row)` (the iteration's draws), so a resumed run repeats the rollouts exactly.
"""

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..adapters import swapped_weights
from ..training_module import GUIDANCE_ROLE, STUDENT_ROLE
from .draws import IterationDraws
from .objective import DMDRObjective, MicroBatch, Routes
from .policy import (
    best_and_worst,
    diffusion_dpo_loss,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    ppo_clipped_loss,
    transition_mean_std,
)
from .simulation import SimulationOutput


REGULARIZERS = ("dmd", "kl", "none")


@dataclass
class Rollout:
    """The scored trajectories of a micro-batch (rows `g * G ..` are one group: one prompt, G noises).

    Args:
        states (`torch.Tensor` of shape `(N, B, ...)`): the sampler's input at each student step (`states[0]` is the
            initial noise).
        predictions (`torch.Tensor` of shape `(N, B, ...)`): the student's x0 at each step (no graph).
        rewards (`torch.Tensor` of shape `(B,)`): the weighted reward of each final sample.
        reward_means (`dict[str, float]`): each reward's batch mean, for the logs.
    """

    states: torch.Tensor
    predictions: torch.Tensor
    rewards: torch.Tensor
    reward_means: dict[str, float]


@dataclass
class RLMicroBatch(MicroBatch):
    """A stage-2 micro-batch of the RL objectives: DMDR's fields (the simulation's `student_input` is the trajectory
    state at each row's drawn step) plus the scored rollout."""

    rollout: Rollout


def take_rows(condition: dict, index: torch.Tensor) -> dict:
    """The rows `index` of a conditioning dict (nested dicts of batch-first tensors)."""
    return {
        key: take_rows(value, index) if isinstance(value, dict) else value[index.to(value.device)]
        for key, value in condition.items()
    }


def draws_rows(draws: IterationDraws, index: list[int]) -> IterationDraws:
    """The draws of the rows `index` (any order, repeats allowed)."""
    return IterationDraws(
        [draws.generators[row] for row in index],
        draws.step_index[index],
        draws.fake_noise_levels[index],
        draws.dmd_noise_levels[index],
        draws.monitor_noise_levels[index],
        draws.guidance_scale,
    )


class RolloutObjective(DMDRObjective):
    """What GRPO and DPO share: DMDR's stage 1, grouped and scored rollouts in stage 2, the frozen reference.

    Args:
        config ([`DMDRConfig`]): the run's configuration (`rl_*` fields).
        routes ([`Routes`]): the training module's routes.
    """

    def __init__(self, config, routes: Routes):
        super().__init__(config, routes)
        self.group_size = config.rl_group_size
        self.regularizer = config.rl_regularizer
        # The sde sampler is the policy itself (eta = 1); an ode student explores at `rl_noise_level`.
        self.eta = 1.0 if self.simulation_mode == "sde" else config.rl_noise_level
        # The fake score trains in every arm (stage 1 needs it; in stage 2 it idles only in cost), so all arms run the
        # same TTUR, rollouts and number of generator steps.
        self.trained_roles = (STUDENT_ROLE, GUIDANCE_ROLE)
        self.reference_weights: list[torch.Tensor] | None = None
        if len(self.scheduler.noise_levels) < 2:
            raise ValueError(
                f"--rl {self.name} needs a student of at least 2 steps: a 1-step sampler has no transition."
            )

    # ------------------------------------------------------------------------------------------------------------
    # The frozen reference: the stage-1 student
    # ------------------------------------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    def before_update(self, role: str, global_step: int) -> None:
        super().before_update(role, global_step)
        stage_two = global_step >= self.config.cold_start_steps
        if role == STUDENT_ROLE and stage_two and self.needs_reference and self.reference_weights is None:
            self.reference_weights = [p.detach().clone() for p in self.routes.student_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference weights (this process's local shards), once stage 2 has started."""
        if self.reference_weights is None:
            return {}
        return {f"reference.{index}": _local(tensor) for index, tensor in enumerate(self.reference_weights)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        parameters = self.routes.student_parameters()
        if len(state) != len(parameters):
            raise ValueError(f"The checkpoint holds {len(state)} reference tensors for {len(parameters)} parameters.")
        self.reference_weights = []
        for index, parameter in enumerate(parameters):
            reference = parameter.detach().clone()
            _local(reference).copy_(state[f"reference.{index}"])
            self.reference_weights.append(reference)

    @torch.no_grad()
    def reference_x0(self, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict) -> torch.Tensor:
        """The stage-1 student's x0 (its weights swapped in for one forward pass)."""
        with swapped_weights(self.routes.student_parameters(), self.reference_weights), self.routes.autocast():
            return self.routes.student(sample, noise_level, condition)

    def generator_updates_per_rollout(self, global_step: int) -> int:
        """`rl_inner_epochs` optimizer steps per stage-2 rollout (Flow-GRPO's inner epochs): the later ones see the
        rollouts' log-probabilities under an updated student, so the PPO ratio moves off 1 and the clip acts."""
        return self.config.rl_inner_epochs if global_step >= self.config.cold_start_steps else 1

    # ------------------------------------------------------------------------------------------------------------
    # Rollout
    # ------------------------------------------------------------------------------------------------------------
    def rollout(
        self, iteration: int, global_step: int, prompts: list[str], first_row: int, micro_batches: int
    ) -> list[MicroBatch]:
        # The trainer updates the generator after the iteration whose count, once incremented, is a multiple of the
        # TTUR ratio; the other iterations only train the fake score on DMDR's backward simulation.
        updates_generator = (iteration + 1) % self.update_ratio == 0
        if global_step < self.config.cold_start_steps or not updates_generator:
            return super().rollout(iteration, global_step, prompts, first_row, micro_batches)
        size, group = len(prompts) // micro_batches, self.group_size
        if size % group or first_row % group:
            raise ValueError(
                f"--rl {self.name}: a micro-batch of {size} rows cannot hold whole groups of {group}; make "
                "--train_batch_size a multiple of --rl_group_size."
            )
        # Every row of a group shares the prompt of its first row: one prompt, G noises.
        prompts = [prompts[(row // group) * group] for row in range(len(prompts))]
        draws = self.draws(iteration, global_step, first_row, len(prompts))
        batches = []
        for index in range(micro_batches):
            rows = slice(index * size, (index + 1) * size)
            condition, batch_draws = self.routes.encode(prompts[rows]), draws.rows(rows)
            rollout = self.sample_and_score(prompts[rows], condition, batch_draws)
            step_index = torch.from_numpy(batch_draws.step_index)
            sample_rows = torch.arange(size)
            noise_levels = self.scheduler.noise_levels.to(rollout.states.device)
            clean_sample = (
                rollout.predictions[-1]
                if self.simulation_mode == "ode"
                else rollout.predictions[step_index, sample_rows]
            )
            simulation = SimulationOutput(
                clean_sample=clean_sample,
                student_input=rollout.states[step_index, sample_rows],
                noise_level=noise_levels[step_index.to(noise_levels.device)],
                step_index=step_index,
                final_sample=rollout.predictions[-1],
            )
            batches.append(RLMicroBatch(prompts[rows], condition, batch_draws, simulation, rollout))
        return batches

    @torch.no_grad()
    def sample_and_score(self, prompts: list[str], condition: dict, draws: IterationDraws) -> Rollout:
        """Run the stochastic sampler from each row's noise, keep its states and predictions, score the outputs."""
        routes, scheduler = self.routes, self.scheduler
        sample = routes.initial_noise(len(prompts), draws.generators)
        noise_levels = scheduler.noise_levels.to(sample.device)
        states, predictions = [], []
        with routes.autocast():
            for step, level in enumerate(noise_levels):
                level = level.expand(len(prompts))
                x0 = routes.student(sample, level, condition)
                states.append(sample)
                predictions.append(x0)
                if step + 1 < len(noise_levels):
                    mean, std = self.transition(x0, sample, step, level)
                    noise = randn_tensor(sample.shape, generator=draws.generators, device=sample.device)
                    sample = (mean + std * noise).to(sample.dtype)
            images = routes.decode(predictions[-1])
        rewards = torch.zeros(len(prompts), device=sample.device)
        reward_means = {}
        for reward in routes.rewards:
            scores = reward.fn(images, prompts).float().to(sample.device)
            rewards = rewards + reward.weight * scores
            reward_means[f"reward/{reward.name}"] = scores.mean().item()
        return Rollout(torch.stack(states), torch.stack(predictions), rewards, reward_means)

    def transition(
        self, x0: torch.Tensor, state: torch.Tensor, step: int | torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the Gaussian move from `state` (at student step `step`, level `level`) to the next level."""
        noise_levels = self.scheduler.noise_levels.to(x0.device)
        next_level = noise_levels[torch.as_tensor(step, device=x0.device) + 1].expand(x0.shape[0])
        next_signal, next_sigma = self.scheduler._coefficients(next_level, x0.ndim)
        implied = None if self.eta == 1.0 else self.scheduler.implied_noise(state, x0, level)
        return transition_mean_std(x0, implied, next_signal, next_sigma, self.eta)

    def group_logs(self, rewards: torch.Tensor) -> dict[str, float]:
        """What people tune RL by: the reward's mean, its spread within groups, the share of groups without signal."""
        grouped = rewards.view(-1, self.group_size)
        spread = grouped.std(dim=1, unbiased=False)
        return {
            "rl/reward_mean": rewards.mean().item(),
            "rl/reward_group_std": spread.mean().item(),
            "rl/reward_group_range": (grouped.max(dim=1).values - grouped.min(dim=1).values).mean().item(),
            "rl/groups_without_signal": (spread == 0).float().mean().item(),
        }


class GRPOObjective(RolloutObjective):
    """GRPO on the student's own sampler, with DMD (or Flow-GRPO's KL, or nothing) as the regulariser."""

    name = "grpo"

    @property
    def needs_reference(self) -> bool:
        return self.regularizer == "kl"

    def drawn_transition_terms(
        self,
        batch: RLMicroBatch,
        x0_student: torch.Tensor,
        reference_x0: torch.Tensor | None,
        advantages: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """`--rl_transitions drawn`: the PPO loss (a mean over the micro-batch's rows) and the KL of each row's one
        transition, at its drawn step, from the prediction the DMD term also trains (`x0_student`)."""
        simulation, rollout = batch.simulation, batch.rollout
        device = rollout.states.device
        rows = torch.arange(len(batch.prompts), device=device)
        # Rows drawn at the last step have no stochastic transition: they train DMD only.
        step_index = simulation.step_index.to(device)
        moves = step_index < rollout.states.shape[0] - 1
        next_state = rollout.states[torch.where(moves, step_index + 1, step_index), rows]
        loss_rl = 0.0 * x0_student.sum()  # keeps the graph when no row moves
        stats = {"ratio_mean": 1.0, "clip_fraction": 0.0, "approx_kl": 0.0, "transitions": 0.0}
        kl = torch.zeros((), device=x0_student.device)
        if not moves.any():
            return loss_rl, stats, kl
        index = rows[moves]
        level = simulation.noise_level.to(device)[index]
        with torch.no_grad():
            # The log-probability under the sampler that drew the rollout: the student before this update.
            old_mean, std = self.transition(
                rollout.predictions[step_index[index], index],
                simulation.student_input[index],
                step_index[index],
                level,
            )
            old_log_prob = gaussian_log_prob(next_state[index], old_mean, std)
        mean, std = self.transition(x0_student[index], simulation.student_input[index], step_index[index], level)
        log_prob = gaussian_log_prob(next_state[index], mean, std)
        loss_ppo, ppo_stats = ppo_clipped_loss(log_prob, old_log_prob, advantages[index], self.config.rl_clip_range)
        # A mean over every row of the micro-batch (rows at the last step contribute 0): the same scale whatever the
        # draw.
        share = index.numel() / len(rows)
        stats = {key: value.item() for key, value in ppo_stats.items()}
        stats["transitions"] = float(index.numel())
        if reference_x0 is not None:
            reference_mean, _ = self.transition(
                reference_x0[index], simulation.student_input[index], step_index[index], level
            )
            kl = gaussian_kl(mean, reference_mean, std).mean() * share
        return loss_ppo * share, stats, kl

    def every_transition_terms(
        self, batch: RLMicroBatch, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """`--rl_transitions all`: the PPO loss and the KL averaged over every stochastic transition of every row
        (Flow-GRPO trains the whole trajectory; the mean keeps lambda on the per-transition scale of `drawn`). The
        student runs once on all `(N - 1) * B` states, step-major; each transition carries its row's advantage."""
        routes, rollout = self.routes, batch.rollout
        device = rollout.states.device
        transitions, size = rollout.states.shape[0] - 1, len(batch.prompts)
        step_index = torch.arange(transitions, device=device).repeat_interleave(size)
        rows = torch.arange(size, device=device).repeat(transitions)
        state = rollout.states[:-1].flatten(0, 1)
        next_state = rollout.states[1:].flatten(0, 1)
        level = self.scheduler.noise_levels.to(device)[step_index]
        condition = take_rows(batch.condition, rows)
        with torch.no_grad():
            old_mean, std = self.transition(rollout.predictions[:-1].flatten(0, 1), state, step_index, level)
            old_log_prob = gaussian_log_prob(next_state, old_mean, std)
            # Before the student's graph is built: the reference's weights are swapped in place.
            reference_x0 = self.reference_x0(state, level, condition) if self.regularizer == "kl" else None
        with routes.autocast():
            x0 = routes.student(state, level, condition)
        mean, std = self.transition(x0, state, step_index, level)
        log_prob = gaussian_log_prob(next_state, mean, std)
        loss_ppo, ppo_stats = ppo_clipped_loss(log_prob, old_log_prob, advantages[rows], self.config.rl_clip_range)
        stats = {key: value.item() for key, value in ppo_stats.items()}
        stats["transitions"] = float(rows.numel())
        kl = torch.zeros((), device=x0.device)
        if reference_x0 is not None:
            reference_mean, _ = self.transition(reference_x0, state, step_index, level)
            kl = gaussian_kl(mean, reference_mean, std).mean()
        return loss_ppo, stats, kl

    def generator_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(batch, RLMicroBatch):
            return super().generator_loss(batch, global_step)
        config, routes, simulation, rollout = self.config, self.routes, batch.simulation, batch.rollout
        reference_x0 = None
        if self.regularizer == "kl" and config.rl_transitions == "drawn":
            reference_x0 = self.reference_x0(simulation.student_input, simulation.noise_level, batch.condition)
        # The prediction at each row's drawn step serves the drawn transition, the DMD term and the monitor; with
        # `--rl_transitions all` and no DMD term nothing reads it, so that forward is skipped.
        x0_student = None
        if config.rl_transitions == "drawn" or self.regularizer == "dmd" or routes.eval_rewards:
            with routes.autocast():
                x0_student = routes.student(simulation.student_input, simulation.noise_level, batch.condition)
        logs = dict(rollout.reward_means)
        logs.update(self.group_logs(rollout.rewards))
        loss = torch.zeros((), device=rollout.states.device)
        if self.regularizer == "dmd":
            loss_dmd = self.dmd_loss(x0_student, batch, global_step)
            loss = loss + config.dmd_loss_weight * loss_dmd
            logs["loss_dmd"] = loss_dmd.item()
        advantages = group_advantages(rollout.rewards, self.group_size, config.rl_advantage_clip)
        logs.update(
            {"rl/advantage_abs_mean": advantages.abs().mean().item(), "rl/advantage_max": advantages.max().item()}
        )
        if config.rl_transitions == "all":
            loss_rl, stats, kl = self.every_transition_terms(batch, advantages)
        else:
            loss_rl, stats, kl = self.drawn_transition_terms(batch, x0_student, reference_x0, advantages)
        loss = loss + config.rl_weight * loss_rl
        logs.update({"loss_rl": loss_rl.detach().item(), **{f"rl/{key}": value for key, value in stats.items()}})
        if self.regularizer == "kl":
            loss = loss + config.rl_kl_weight * kl
            logs["rl/kl_reference"] = kl.item()
        if routes.eval_rewards:
            logs.update(self._monitor(x0_student.detach(), None, batch))
        logs["loss"] = loss.item()
        return loss, logs


class DPOObjective(RolloutObjective):
    """Diffusion-DPO on on-policy pairs (best and worst of each group), with DMD (or nothing) as the regulariser."""

    name = "dpo"

    @property
    def needs_reference(self) -> bool:
        # Diffusion-DPO is defined against a reference in every arm.
        return True

    def generator_loss(self, batch: MicroBatch, global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(batch, RLMicroBatch):
            return super().generator_loss(batch, global_step)
        config, routes, rollout = self.config, self.routes, batch.rollout
        winners, losers, informative = best_and_worst(rollout.rewards, self.group_size)
        pair_rows = torch.cat([winners, losers]).cpu()
        draws = draws_rows(batch.draws, pair_rows.tolist())
        # Both members of a pair are noised at the winner's drawn student level with one shared noise (Diffusion-DPO
        # compares the two denoising errors on equal footing).
        noise_levels = self.scheduler.noise_levels.to(rollout.states.device)
        level = noise_levels[torch.from_numpy(batch.draws.step_index[winners.cpu().numpy()]).to(noise_levels.device)]
        level = torch.cat([level, level])
        targets = rollout.predictions[-1][pair_rows]
        shared_noise = randn_tensor(
            targets[: len(winners)].shape, generator=draws.generators[: len(winners)], device=targets.device
        )
        noisy = self.scheduler.add_noise_at(targets, torch.cat([shared_noise, shared_noise]), level)
        condition = take_rows(batch.condition, pair_rows)
        reference_x0 = self.reference_x0(noisy, level, condition)
        with routes.autocast():
            x0_student = routes.student(noisy, level, condition)
        errors = (x0_student.float() - targets.float()).pow(2).mean(dim=tuple(range(1, targets.ndim)))
        reference_errors = (reference_x0.float() - targets.float()).pow(2).mean(dim=tuple(range(1, targets.ndim)))
        count = len(winners)
        loss_dpo, stats = diffusion_dpo_loss(
            errors[:count],
            errors[count:],
            reference_errors[:count],
            reference_errors[count:],
            config.rl_dpo_beta,
            weights=informative.float(),
        )
        logs = dict(rollout.reward_means)
        logs.update(self.group_logs(rollout.rewards))
        logs.update({f"rl/{key}": value.item() for key, value in stats.items()})
        logs["rl/pair_reward_gap"] = (rollout.rewards[winners] - rollout.rewards[losers]).mean().item()
        loss = config.rl_weight * loss_dpo
        pair_batch = MicroBatch([batch.prompts[row] for row in pair_rows.tolist()], condition, draws, None)
        if self.regularizer == "dmd":
            loss_dmd = self.dmd_loss(x0_student, pair_batch, global_step)
            loss = loss + config.dmd_loss_weight * loss_dmd
            logs["loss_dmd"] = loss_dmd.item()
        if routes.eval_rewards:
            logs.update(self._monitor(x0_student.detach(), None, pair_batch))
        logs.update({"loss_rl": loss_dpo.item(), "loss": loss.item()})
        return loss, logs


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
