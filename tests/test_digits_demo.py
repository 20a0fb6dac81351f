"""The demo's pieces that need no training run: the resolved recipe and the metrics table."""

import json

import yaml

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.demo import (
    DIGITS_RECIPE,
    REWARD_CLASS,
    format_table,
    read_training_curves,
    trainer_command,
    write_recipe,
)
from diffusers_dmdr.digits import DigitsTestbed
from diffusers_dmdr.rewards import parse_reward_spec


def test_recipe_is_filled_with_the_testbed_paths_and_parses(tmp_path):
    testbed = DigitsTestbed(tmp_path / "cache" / "digits-v1-x")
    recipe = write_recipe(
        DIGITS_RECIPE, testbed, tmp_path, overrides={"max_train_steps": 3, "cold_start_steps": 1, "dynamic_steps": 1}
    )
    config = DMDRConfig.parse_args(["--config", str(recipe)])
    assert config.pretrained_model_name_or_path == str(testbed.teacher_dir)
    assert config.train_prompts == str(testbed.prompts_file)
    assert config.output_dir == str(tmp_path / "student")
    assert config.resolution == 32 and config.max_train_steps == 3
    (spec,) = [parse_reward_spec(spec) for spec in config.reward]
    assert spec.name == REWARD_CLASS and spec.hinge is None
    assert spec.options["model"] == str(testbed.reward_weights)
    command = trainer_command(recipe)
    assert command[-2:] == ["--config", str(recipe)] and "accelerate.commands.launch" in command


def test_metrics_table_and_training_curves(tmp_path):
    rows = {"teacher": {"nfe_per_sample": 50, "accuracy": 1.0, "fd": 0.8312}, "real": {"accuracy": 0.975}}
    table = format_table(rows).splitlines()
    assert table[0].startswith("| model | steps | NFE | accuracy")
    assert table[2].startswith("| teacher | - | 50 | 1 |") and "0.831" in table[2]
    history = [{"step": 1, "loss_dmd": 0.5, "stage": 1.0}, {"step": 2, "loss_dmd": 0.4, "reward/x": -0.1}]
    (tmp_path / "train_summary.json").write_text(json.dumps({"history": history}))
    curves = read_training_curves(tmp_path)
    assert curves["loss_dmd"] == ([1, 2], [0.5, 0.4]) and curves["reward/x"] == ([2], [-0.1])
    assert yaml.safe_load(DIGITS_RECIPE.read_text())["resolution"] == 32
