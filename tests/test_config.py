"""DMDRConfig: CLI and YAML parsing, validation messages, shipped recipes, and no unread fields."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.config import build_argument_parser
from diffusers_dmdr.rewards import parse_reward_spec


ROOT = Path(__file__).resolve().parents[1]
# The paper's recipes; `digits.yaml` (the built-in demo) is checked by the digits tests.
PAPER_RECIPE_NAMES = (
    "sdxl_1step",
    "sdxl_4step",
    "sd3_medium_4step",
    "sd35_large_4step",
    "sd3_medium_4step_srpo",
    "sd35_large_4step_srpo",
)
RECIPES = [ROOT / "examples" / "train_dmdr" / "configs" / f"{name}.yaml" for name in PAPER_RECIPE_NAMES]
REQUIRED = ["--pretrained_model_name_or_path", "teacher", "--train_prompts", "prompts.txt"]


def test_cli_parsing_types_and_repeated_rewards():
    config = DMDRConfig.parse_args(
        REQUIRED
        + [
            "--reward",
            "clip:0.3",
            "--reward",
            "hpsv2.1:0.3",
            "--num_student_steps",
            "2",
            "--student_timesteps",
            "999",
            "499",
        ]
        + ["--use_8bit_adam", "--gradient_checkpointing", "false", "--checkpoints_total_limit", "none"]
    )
    assert config.reward == ["clip:0.3", "hpsv2.1:0.3"]
    assert config.student_timesteps == [999.0, 499.0]
    assert config.use_8bit_adam is True and config.gradient_checkpointing is False
    assert config.checkpoints_total_limit is None


def test_yaml_values_are_defaults_that_the_cli_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 3.0e-4\nmax_train_steps: 7\nreward:\n  - {name: clip, weight: 0.2}\n")
    config = DMDRConfig.parse_args(
        REQUIRED + ["--config", str(recipe), "--max_train_steps", "9", "--cold_start_steps", "3"]
    )
    assert config.learning_rate == 3e-4 and config.max_train_steps == 9
    assert parse_reward_spec(config.reward[0]).weight == 0.2


def test_unknown_yaml_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="Unknown option.*learning_rat"):
        DMDRConfig.parse_args(REQUIRED + ["--config", str(recipe)])


def test_bad_choices_fail_in_argparse():
    with pytest.raises(SystemExit):
        build_argument_parser().parse_args(REQUIRED + ["--training_mode", "half"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_student_steps": 9}, "between 1 and 8"),
        ({"num_student_steps": 2, "student_timesteps": [999, 749, 499]}, "one timestep per student step"),
        ({"cold_start_steps": 10, "max_train_steps": 5}, "longer than --max_train_steps"),
        ({"update_ratio": 0}, "update_ratio must be at least 1"),
        ({"push_to_hub": True}, "--hub_model_id"),
        ({"pretrained_model_name_or_path": None}, "--pretrained_model_name_or_path is required"),
    ],
)
def test_validation_messages_name_the_fix(overrides, message):
    values = {
        "pretrained_model_name_or_path": "teacher",
        "train_prompts": "p.txt",
        "max_train_steps": 5,
        "cold_start_steps": 5,
    }
    with pytest.raises(ValueError, match=message):
        DMDRConfig(**{**values, **overrides})


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_load_and_validate(recipe):
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    assert config.cold_start_steps < config.max_train_steps
    assert config.dynamic_steps <= config.cold_start_steps
    specs = [parse_reward_spec(spec) for spec in config.reward]
    assert {spec.name for spec in specs} in ({"clip", "hpsv2.1"}, {"clip", "relative"})
    assert config.stage2_train_batch_size is not None and config.allow_tf32


def test_every_config_field_is_read_by_the_code():
    sources = "\n".join(
        path.read_text(encoding="utf-8")
        for folder in ("src/diffusers_dmdr", "examples/train_dmdr")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "config.py"
    )
    unread = [
        f.name for f in dataclasses.fields(DMDRConfig) if not re.search(rf"(config|cfg|self)\.{f.name}\b", sources)
    ]
    assert unread == [], f"config fields nobody reads: {unread}"


RELEASED = yaml.safe_load((ROOT / "tests" / "data" / "released_recipes.yaml").read_text(encoding="utf-8"))


def test_every_released_script_has_a_recipe():
    assert set(RELEASED) <= set(PAPER_RECIPE_NAMES)
    # The one recipe without a released script is the paper's SDXL 4-step row.
    assert set(PAPER_RECIPE_NAMES) - set(RELEASED) == {"sdxl_4step"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recipe_matches_the_released_script(name):
    """Every value of the released script, stage 2 included, and the global batch the recipe states."""
    released = dict(RELEASED[name])
    recipe = ROOT / "examples" / "train_dmdr" / "configs" / f"{name}.yaml"
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    gpus, stage2, rewards = released.pop("gpus"), released.pop("stage2"), released.pop("rewards")
    mismatches = {
        key: (getattr(config, key), value) for key, value in released.items() if getattr(config, key) != value
    }
    for key, value in stage2.items():
        if getattr(config, f"stage2_{key}") != value:
            mismatches[f"stage2.{key}"] = (getattr(config, f"stage2_{key}"), value)
    assert mismatches == {}, f"recipe value != released value: {mismatches}"
    # Stage 2 as the released runs: at the cold start the overrides take over.
    from diffusers_dmdr.stages import stage_values

    late = stage_values(config, config.cold_start_steps)
    assert (late.learning_rate, late.learning_rate_fake, late.train_batch_size) == (
        stage2["learning_rate"],
        stage2["learning_rate_fake"],
        stage2["train_batch_size"],
    )
    specs = {spec.name: spec for spec in map(parse_reward_spec, config.reward)}
    assert set(specs) == set(rewards)
    for reward_name, expected in rewards.items():
        expected = dict(expected)
        assert specs[reward_name].weight == expected.pop("weight") and specs[reward_name].hinge == expected.pop(
            "hinge"
        )
        assert {key: specs[reward_name].options.get(key) for key in expected} == expected
    # The header states the released global batch of both stages (per-GPU batch x GPUs).
    header = recipe.read_text(encoding="utf-8")
    stage1_batch, stage2_batch = config.train_batch_size, stage2["train_batch_size"]
    assert f"{stage1_batch} x {gpus} = {stage1_batch * gpus} in stage 1" in header
    assert f"{stage2_batch} x {gpus} = {stage2_batch * gpus} in stage 2" in header
