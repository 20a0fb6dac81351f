"""GRPO and DPO objectives (`--rl grpo`, `--rl dpo`) in the trainer on a tiny teacher: stage 2 on rewards without
gradients, the regulariser arms, zero gradient from a reward that ignores the image, exact resume mid-stage-2."""

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.families import get_family
from diffusers_dmdr.rewards import LoadedReward
from diffusers_dmdr.rewards.core import FrozenReward
from diffusers_dmdr.rewards.scores import ScoreReward, score_reward
from diffusers_dmdr.trainer import DMDRTrainer
from diffusers_dmdr.training_module import STUDENT_ROLE


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


@score_reward
def brightness(images, prompts):
    """A reward without gradients: the mean of each uint8 image."""
    return [float(image.mean()) / 255.0 for image in images]


@score_reward
def prompt_length(images, prompts):
    """Reads the prompt only: the same score for every image of a group."""
    return [float(len(prompt)) for prompt in prompts]


def score(fn, weight=1.0):
    return LoadedReward(name=fn.__name__, fn=FrozenReward(ScoreReward(fn), fn.__name__), weight=weight, hinge=None)


def make_trainer(teacher_dir, prompt_file, output_dir, rewards, **overrides):
    values = dict(rl="grpo", rl_group_size=2, train_batch_size=4, max_train_steps=3, cold_start_steps=1)
    config = tiny_config(teacher_dir, prompt_file, output_dir, **{**values, **overrides})
    teacher = get_family("sdxl").load_teacher(config.pretrained_model_name_or_path)
    return DMDRTrainer(config, teacher, PROMPTS, rewards=rewards)


def lora_weights(model, adapter_name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter_name}." in n}


@pytest.mark.parametrize(
    ("rl", "regularizer", "simulation", "transitions"),
    [
        ("grpo", "dmd", "sde", "drawn"),
        ("grpo", "dmd", "ode", "drawn"),
        ("grpo", "kl", "sde", "drawn"),
        ("grpo", "none", "sde", "drawn"),
        ("grpo", "dmd", "sde", "all"),
        ("grpo", "kl", "ode", "all"),
        ("dpo", "dmd", "sde", "drawn"),
    ],
)
def test_stage_two_trains_on_a_reward_without_gradients(
    tiny_teacher_dirs, prompt_file, tmp_path, rl, regularizer, simulation, transitions
):
    # `ode` students explore with the coefficients-preserving sampler at --rl_noise_level.
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        [score(brightness)],
        rl=rl,
        rl_regularizer=regularizer,
        backward_simulation=simulation,
        rl_transitions=transitions,
    )
    assert trainer.objective.eta == (1.0 if simulation == "sde" else 0.7)
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    history = trainer.train()
    stage_one, stage_two = history[0], history[1:]
    # Stage 1 is DMDR's cold start, unchanged; stage 2 logs what RL is tuned by.
    assert "loss_dmd" in stage_one and "rl/reward_mean" not in stage_one
    for row in stage_two:
        assert 0.0 <= row["rl/reward_mean"] <= 1.0 and row["rl/reward_group_std"] >= 0.0
        assert row["reward/brightness"] == pytest.approx(row["rl/reward_mean"])
        assert ("loss_dmd" in row) == (regularizer == "dmd")
        assert ("rl/kl_reference" in row) == (regularizer == "kl")
        if rl == "grpo":
            # One generator update per rollout: the PPO ratio is 1 (up to float rounding) and nothing is clipped.
            assert row["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and row["rl/clip_fraction"] == 0.0
            assert row["rl/advantage_abs_mean"] > 0.0
            # `all`: every stochastic transition of the 4 rows (N - 1 each); `drawn`: one per row not drawn at the
            # last step.
            rows, transitions_per_row = 4, trainer.config.num_student_steps - 1
            if transitions == "all":
                assert row["rl/transitions"] == rows * transitions_per_row
            else:
                assert 0 <= row["rl/transitions"] <= rows
        else:
            assert 0.0 <= row["rl/implicit_accuracy"] <= 1.0 and row["rl/pair_reward_gap"] >= 0.0
    if regularizer == "kl":
        # The reference is the student as stage 2 began: no KL at the first stage-2 step, some once it moved.
        assert stage_two[0]["rl/kl_reference"] == 0.0 and stage_two[1]["rl/kl_reference"] > 0.0
    moved = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    assert any(not torch.equal(moved[name], student_before[name]) for name in moved)


@pytest.mark.parametrize("regularizer", ["dmd", "kl"])
def test_inner_epochs_move_the_ratio_and_the_clip_acts(tiny_teacher_dirs, prompt_file, tmp_path, regularizer):
    """With one optimizer step per rollout the PPO ratio is 1 and nothing is clipped; with 2 inner epochs the second
    step sees the rollout under the updated student: the ratio leaves 1 and part of the batch is clipped."""
    calls = {}
    for epochs in (1, 2):
        trainer = make_trainer(
            tiny_teacher_dirs["sdxl"],
            prompt_file,
            tmp_path / str(epochs),
            [score(brightness)],
            rl_regularizer=regularizer,
            rl_inner_epochs=epochs,
        )
        loss_fn, calls[epochs] = trainer.objective.generator_loss, []

        def recording(batch, global_step, loss_fn=loss_fn, record=calls[epochs]):
            loss, logs = loss_fn(batch, global_step)
            record.append((global_step, logs))
            return loss, logs

        trainer.objective.generator_loss = recording
        history = trainer.train()
        # Stage 1 (step 0) is one update; each stage-2 generator step is `epochs` optimizer steps on one rollout.
        assert [step for step, _ in calls[epochs]] == [0] + [step for step in (1, 2) for _ in range(epochs)]
        stage_two = [logs for step, logs in calls[epochs] if step > 0]
        if epochs == 1:
            for logs in stage_two:
                assert logs["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and logs["rl/clip_fraction"] == 0.0
        else:
            first, second = stage_two[0::2], stage_two[1::2]
            for logs in first:
                assert logs["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and logs["rl/clip_fraction"] == 0.0
            # Rollout and reward are shared by the epochs of a step; the student is not.
            for a, b in zip(first, second, strict=True):
                assert a["rl/reward_mean"] == b["rl/reward_mean"]
                assert b["rl/clip_fraction"] > 0.0 and b["rl/approx_kl"] > 0.0
            # The logged values of a generator step are the means over its inner epochs.
            for row, a, b in zip(history[1:], first, second, strict=True):
                assert row["rl/clip_fraction"] == pytest.approx((a["rl/clip_fraction"] + b["rl/clip_fraction"]) / 2)


def _stage_two_gradient(trainer):
    """The student's gradient from one stage-2 generator loss (DMD off) on the trainer's first rollout."""
    trainer.objective.before_update(STUDENT_ROLE, 0)
    (batch,) = trainer.objective.rollout(
        trainer.config.update_ratio - 1, 0, trainer.prompt_sampler.batch(0), first_row=0, micro_batches=1
    )
    loss, logs = trainer.objective.generator_loss(batch, 0)
    parameters = [p for p in trainer.unwrapped.parameters_of(STUDENT_ROLE)]
    return torch.autograd.grad(loss, parameters, allow_unused=True), logs


@pytest.mark.parametrize("transitions", ["drawn", "all"])
def test_a_reward_that_ignores_the_image_gives_zero_grpo_gradient(
    tiny_teacher_dirs, prompt_file, tmp_path, transitions
):
    common = dict(cold_start_steps=0, rl_regularizer="none", rl_transitions=transitions)
    ignoring = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", [score(prompt_length)], **common)
    grads, logs = _stage_two_gradient(ignoring)
    assert logs["rl/groups_without_signal"] == 1.0 and logs["rl/advantage_abs_mean"] == 0.0
    assert all(grad is None or torch.count_nonzero(grad) == 0 for grad in grads)
    reading = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", [score(brightness)], **common)
    grads, _ = _stage_two_gradient(reading)
    assert any(grad is not None and torch.count_nonzero(grad) > 0 for grad in grads)


def test_every_transition_loss_is_the_mean_of_the_per_step_policy_losses(tiny_teacher_dirs, prompt_file, tmp_path):
    """`--rl_transitions all` runs the student once on every state of the trajectories (step-major, each carrying its
    row's advantage): its gradient equals the mean over student steps of the PPO loss computed one step at a time."""
    from diffusers_dmdr.method.policy import gaussian_log_prob, group_advantages, ppo_clipped_loss

    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        [score(brightness)],
        cold_start_steps=0,
        rl_regularizer="none",
        rl_transitions="all",
    )
    objective, config = trainer.objective, trainer.config
    objective.before_update(STUDENT_ROLE, 0)
    (batch,) = objective.rollout(config.update_ratio - 1, 0, trainer.prompt_sampler.batch(0), 0, micro_batches=1)
    parameters = list(trainer.unwrapped.parameters_of(STUDENT_ROLE))
    advantages = group_advantages(batch.rollout.rewards, config.rl_group_size, config.rl_advantage_clip)

    def per_step_gradient(advantages):
        states, predictions = batch.rollout.states, batch.rollout.predictions
        levels = objective.scheduler.noise_levels
        total = 0.0
        for step in range(states.shape[0] - 1):
            level = levels[step].expand(len(batch.prompts))
            x0 = trainer.objective.routes.student(states[step], level, batch.condition)
            mean, std = objective.transition(x0, states[step], step, level)
            old_mean, _ = objective.transition(predictions[step], states[step], step, level)
            log_prob = gaussian_log_prob(states[step + 1], mean, std)
            old_log_prob = gaussian_log_prob(states[step + 1], old_mean, std)
            total = total + ppo_clipped_loss(log_prob, old_log_prob, advantages, config.rl_clip_range)[0]
        return torch.autograd.grad(total / (states.shape[0] - 1), parameters, allow_unused=True)

    loss, stats, _ = objective.every_transition_terms(batch, advantages)
    assert stats["transitions"] == len(batch.prompts) * (config.num_student_steps - 1)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    batched = torch.autograd.grad(loss, parameters, allow_unused=True)
    expected = per_step_gradient(advantages)
    flat = lambda grads: torch.cat([g.flatten() for g in grads if g is not None])  # noqa: E731
    torch.testing.assert_close(flat(batched), flat(expected), rtol=1e-4, atol=1e-7)
    # Negative control: the advantages paired with other rows give another gradient.
    other = per_step_gradient(advantages.roll(1))
    assert not torch.allclose(flat(batched), flat(other), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("rl", "regularizer", "inner_epochs", "transitions"),
    [("grpo", "kl", 1, "drawn"), ("dpo", "dmd", 1, "drawn"), ("grpo", "kl", 2, "drawn"), ("grpo", "kl", 1, "all")],
)
def test_resume_mid_stage_two_continues_exactly(
    tiny_teacher_dirs, prompt_file, tmp_path, rl, regularizer, inner_epochs, transitions
):
    """The groups' randomness comes from (seed, iteration, row) and the stage-1 reference is saved with each
    checkpoint, so a run resumed in stage 2 repeats the uninterrupted one bit for bit (with inner epochs too: all the
    optimizer steps on a rollout belong to one generator step, and checkpoints fall between generator steps)."""
    common = dict(
        rl=rl,
        rl_regularizer=regularizer,
        rl_inner_epochs=inner_epochs,
        rl_transitions=transitions,
        max_train_steps=4,
        checkpointing_steps=3,
    )
    rewards = [score(brightness)]
    uninterrupted = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", rewards, **common)
    history_a = uninterrupted.train()
    first = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", rewards, **{**common, "max_train_steps": 3}
    )
    first.train()
    assert (tmp_path / "b" / "checkpoint-3" / "objective_state_0.safetensors").is_file()
    second = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", rewards, **common, resume_from_checkpoint="latest"
    )
    history_b = second.train()
    assert history_b[0]["step"] == 4
    for key in ("loss", "loss_rl", "loss_fake", "rl/reward_mean"):
        assert history_a[3][key] == history_b[0][key], key
    for adapter, model_a, model_b in (
        (STUDENT_ADAPTER, uninterrupted.student_model, second.student_model),
        (FAKE_ADAPTER, uninterrupted.guidance_model, second.guidance_model),
    ):
        weights_a, weights_b = lora_weights(model_a, adapter), lora_weights(model_b, adapter)
        for name in weights_a:
            assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(rl_group_size=3), "not a multiple of --rl_group_size"),
        (dict(rl_group_size=1), "at least 2"),
        (dict(rl="dpo", rl_regularizer="kl"), "reference built in"),
        (dict(rl="dpo", rl_transitions="all"), "is GRPO's"),
        (dict(num_student_steps=1, student_timesteps=[999]), "at least 2 student steps"),
        (dict(rl_noise_level=0.0), "rl_noise_level"),
        (dict(rl_inner_epochs=0), "rl_inner_epochs must be at least 1"),
    ],
)
def test_bad_rl_settings_fail_in_one_line(tmp_path, prompt_file, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("teacher", prompt_file, tmp_path, **{"rl": "grpo", "train_batch_size": 4, **overrides})


@pytest.mark.parametrize("name", ["sd35_large_4step_grpo", "flux1_dev_4step_grpo"])
def test_grpo_recipes_load_and_their_rewards_validate(name):
    from pathlib import Path

    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.rewards import validate_reward_specs

    recipe = Path(__file__).parents[1] / "examples" / "train_dmdr" / "configs" / f"{name}.yaml"
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    assert config.rl == "grpo" and config.rl_regularizer == "dmd" and config.backward_simulation == "ode"
    assert config.stage2_train_batch_size % config.rl_group_size == 0
    validate_reward_specs(config.reward)


def test_grpo_accumulation_equals_one_batch(tiny_teacher_dirs, prompt_file, tmp_path):
    """Groups stay whole within micro-batches, so two accumulated micro-batches of 2 rows (one group each) make the
    same update as one batch of 4 (the same holds for processes: a process holds whole groups)."""
    # Large Adam epsilon: updates proportional to the gradients, so float rounding is not magnified (test_scale.py).
    common = dict(max_train_steps=2, rl_group_size=2, adam_epsilon=1.0, learning_rate=0.5, learning_rate_fake=0.5)
    one = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", [score(brightness)], train_batch_size=4, **common
    )
    two = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path / "b",
        [score(brightness)],
        train_batch_size=2,
        gradient_accumulation_steps=2,
        **common,
    )
    history_one, history_two = one.train(), two.train()
    for key in ("loss", "loss_dmd", "loss_fake", "rl/reward_mean", "rl/advantage_abs_mean"):
        assert history_two[-1][key] == pytest.approx(history_one[-1][key], rel=1e-4, abs=1e-7), key
    weights_one = lora_weights(one.student_model, STUDENT_ADAPTER)
    weights_two = lora_weights(two.student_model, STUDENT_ADAPTER)
    assert any(weights_one[name].abs().max() > 0 for name in weights_one)
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("rl", "reward", "message"),
    [
        ("refl", "diffusers_dmdr.digits.scorer.DigitPairScorer:1.0", "train on it with --rl grpo or --rl dpo"),
        ("grpo", None, "give at least one --reward"),
    ],
)
def test_preflight_refuses_what_the_objective_cannot_train(
    tiny_teacher_dirs, prompt_file, tmp_path, rl, reward, message
):
    from diffusers_dmdr.preflight import check_run_inputs

    rewards = [] if reward is None else [reward]
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, rl=rl, train_batch_size=4, reward=rewards)
    with pytest.raises(ValueError, match=message):
        check_run_inputs(config)
