"""DMDRConfig: CLI and YAML parsing, validation messages, shipped recipes, and no unread fields."""

import contextlib
import dataclasses
import io
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
    from diffusers_dmdr.method.stages import stage_values

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


def test_cli_rewards_replace_the_recipe_list_and_none_clears_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward:\n  - {name: clip, weight: 0.3}\n  - hpsv2.1:0.3\neval_reward: [pickscore]\n")
    base = REQUIRED + ["--config", str(recipe)]
    kept = DMDRConfig.parse_args(base)
    assert [parse_reward_spec(spec).name for spec in kept.reward] == ["clip", "hpsv2.1"]
    swapped = DMDRConfig.parse_args(base + ["--reward", "aesthetic:0.1", "--reward", "pickscore:0.2"])
    assert swapped.reward == ["aesthetic:0.1", "pickscore:0.2"] and swapped.eval_reward == ["pickscore"]
    cleared = DMDRConfig.parse_args(base + ["--reward", "none", "--eval_reward", "none"])
    assert cleared.reward == [] and cleared.eval_reward == []
    # `none` then a name: the list restarts.
    assert DMDRConfig.parse_args(base + ["--reward", "none", "--reward", "clip"]).reward == ["clip"]


def test_unset_stage_lengths_follow_max_train_steps(tmp_path):
    short = DMDRConfig.parse_args(REQUIRED + ["--max_train_steps", "4"])
    assert (short.cold_start_steps, short.dynamic_steps) == (2, 2)
    only_cold = DMDRConfig.parse_args(REQUIRED + ["--max_train_steps", "10", "--cold_start_steps", "6"])
    assert (only_cold.cold_start_steps, only_cold.dynamic_steps) == (6, 6)
    only_k = DMDRConfig.parse_args(REQUIRED + ["--max_train_steps", "10", "--dynamic_steps", "3"])
    assert (only_k.cold_start_steps, only_k.dynamic_steps) == (5, 3)
    # Explicit values that conflict still fail, with the message that names the fix.
    with pytest.raises(ValueError, match="longer than --max_train_steps"):
        DMDRConfig.parse_args(REQUIRED + ["--max_train_steps", "4", "--cold_start_steps", "10"])


def test_negative_numbers_in_scientific_notation_parse():
    config = DMDRConfig.parse_args(REQUIRED + ["--adam_weight_decay", "-2.5E+1", "--shift=-1e-2"])
    assert (config.adam_weight_decay, config.shift) == (-25.0, -0.01)
    # The value reaches validation (argparse used to stop at "expected one argument"), which names the flag.
    with pytest.raises(ValueError, match="--learning_rate must be a positive finite number"):
        DMDRConfig.parse_args(REQUIRED + ["--learning_rate", "-1e-4"])


def test_stage2_mapping_in_yaml_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage2:\n  learning_rate: 1.0e-7\n  train_batch_size: 2\n")
    config = DMDRConfig.parse_args(REQUIRED + ["--config", str(recipe), "--stage2_learning_rate_fake", "5e-9"])
    assert (config.stage2_learning_rate, config.stage2_learning_rate_fake, config.stage2_train_batch_size) == (
        1e-7,
        5e-9,
        2,
    )
    assert (
        DMDRConfig.parse_args(
            REQUIRED + ["--config", str(recipe), "--stage2_learning_rate", "3e-7"]
        ).stage2_learning_rate
        == 3e-7
    )
    recipe.write_text("stage2:\n  lr: 1.0e-7\n")
    with pytest.raises(ValueError, match="stage2"):
        DMDRConfig.parse_args(REQUIRED + ["--config", str(recipe)])


def test_help_groups_options_and_lists_the_builtin_rewards():
    from diffusers_dmdr.evaluate import parse_args as evaluate_parse_args
    from diffusers_dmdr.rewards import REWARD_REGISTRY
    from diffusers_dmdr.train import parse_and_check

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help_output:
        parse_and_check(["--help"])
    train_help = help_output.getvalue()
    # Sections of the help text: a title at column 0 ending in ":", then its options.
    groups, title = {}, None
    for row in train_help.splitlines():
        if row and not row.startswith(" ") and row.endswith(":"):
            title = row[:-1]
            groups[title] = []
        elif title and row.startswith("  --"):
            groups[title].append(row.split()[0][2:])
    for title, first in (
        ("Teacher and student", "pretrained_model_name_or_path"),
        ("Method (DMD, DynaDG, DynaRS, TTUR)", "fake_score_lora_scale"),
        ("Stages and rewards", "cold_start_steps"),
        ("Optimisation", "learning_rate"),
        ("Logging, validation, checkpoints and export", "output_dir"),
    ):
        assert first in groups[title], title
    assert "reward" in groups["Stages and rewards"] and "stage2_learning_rate" in groups["Stages and rewards"]
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as evaluate_help:
        evaluate_parse_args(["--help"])
    for text in (train_help, evaluate_help.getvalue()):
        for name in REWARD_REGISTRY:
            line = next((row for row in text.splitlines() if row.strip().startswith(f"{name} ")), None)
            assert line is not None and len(line.split()) > 3, f"{name} is not listed with a description"


def test_every_config_field_is_documented_in_the_class_docstring():
    documented = set()
    for line in DMDRConfig.__doc__.splitlines():
        match = re.match(r"^\s{4}([a-z0-9_]+(?:, [a-z0-9_]+)*) \(", line)
        if match:
            documented.update(match.group(1).split(", "))
    missing = [f.name for f in dataclasses.fields(DMDRConfig) if f.name not in documented]
    assert missing == [], f"fields without an entry in the DMDRConfig docstring: {missing}"


def test_family_choices_are_the_registered_families():
    """`--family` offers `auto` and exactly the families the package implements (the config cannot import them)."""
    from diffusers_dmdr.config import FAMILY_NAMES
    from diffusers_dmdr.families import FAMILIES

    assert FAMILY_NAMES[0] == "auto" and set(FAMILY_NAMES[1:]) == set(FAMILIES)
    assert build_argument_parser()._option_string_actions["--family"].choices == FAMILY_NAMES


def test_a_parsed_config_saves_and_reloads(tmp_path):
    """What train.py writes to `dmdr_config.yaml` (flags' reward lists included) reads back to the same values."""
    config = DMDRConfig.parse_args(
        REQUIRED + ["--reward", "clip:0.3", "--eval_reward", "aesthetic", "--allow_tf32", "on"]
    )
    config.save_yaml(tmp_path / "saved.yaml")
    reloaded = DMDRConfig.from_yaml(tmp_path / "saved.yaml")
    assert reloaded.to_dict() == config.to_dict() and reloaded.reward == ["clip:0.3"] and reloaded.allow_tf32
