"""RT-DM (reward-tilted distribution matching) as configured: one tilt strength, a refused micro-batch of 1."""

import pytest
from test_preflight import config_for, load_train_script, prompts, weightless_teacher  # noqa: F401  (fixtures)

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.preflight import check_run_inputs


# A reward by import path (tests/reward_fixtures.py): validated without any model file.
REWARD = "reward_fixtures.sum_of_pixels_reward"


def test_a_micro_batch_of_one_is_refused_before_weights_load(weightless_teacher, prompts, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="a micro-batch of 1 has nothing to normalise against"):
        check_run_inputs(config_for(weightless_teacher, prompts, reward=[REWARD], reward_tilt=True))
    # Accumulating micro-batches of 1 does not help: the weights are computed per micro-batch.
    with pytest.raises(ValueError, match="--train_batch_size 2 or more"):
        check_run_inputs(
            config_for(weightless_teacher, prompts, reward=[REWARD], reward_tilt=True, gradient_accumulation_steps=4)
        )
    check_run_inputs(config_for(weightless_teacher, prompts, reward=[REWARD], reward_tilt=True, train_batch_size=2))
    # Without the tilt a batch of 1 is fine.
    check_run_inputs(config_for(weightless_teacher, prompts, reward=[REWARD]))

    capsys.readouterr()
    # The training script says it in one line, exit status 2, before loading the (absent) weights.
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    with pytest.raises(SystemExit) as exit_info:
        load_train_script().main([*argv, "--reward", REWARD, "--reward_tilt", "true", "--resolution", "64"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    # (the prompt file's loading may print a progress bar first)
    assert "Traceback" not in error and "micro-batch of 1" in error.strip().splitlines()[-1]


def test_the_tilt_strength_is_one_validated_flag(tmp_path):
    base = {"pretrained_model_name_or_path": "teacher", "train_prompts": "p.txt"}
    assert DMDRConfig(**base).reward_tilt_strength == 0.5
    with pytest.raises(ValueError, match="--reward_tilt_strength must be a non-negative number"):
        DMDRConfig(**base, reward_tilt_strength=-0.1)
    # A recipe with the removed temperature is told what replaced it.
    recipe = tmp_path / "old.yaml"
    recipe.write_text("pretrained_model_name_or_path: t\ntrain_prompts: p.txt\nreward_tilt_temperature: 2.0\n")
    with pytest.raises(ValueError, match="`reward_tilt_temperature`, which was removed: .*reward_tilt_strength"):
        DMDRConfig.from_yaml(recipe)
