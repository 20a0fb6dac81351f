"""The demo's pieces that need no training run: the recipe built in code, the launch command, the metrics table, the
prompts record, the pair grid, the training curves; and the package layout (works from an installed wheel)."""

import ast
import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import diffusers_dmdr
from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.demo import headline, prompts_record
from diffusers_dmdr.digits import HELD_OUT_PAIRS, DigitSamples, DigitsTestbed, pair_prompts, parse_pair
from diffusers_dmdr.digits.pairs import ALL_PAIRS
from diffusers_dmdr.digits.recipe import DIGITS_RECIPE, REWARD_CLASS, digits_recipe, write_recipe
from diffusers_dmdr.digits.report import format_table, pair_grid, read_training_curves, trainer_command
from diffusers_dmdr.rewards import parse_reward_spec


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(diffusers_dmdr.__file__).parent


def test_recipe_is_built_in_code_filled_with_the_testbed_paths_and_parses(tmp_path):
    testbed = DigitsTestbed(tmp_path / "cache" / "digit-pairs-v1-x")
    recipe = write_recipe(
        testbed, tmp_path, overrides={"max_train_steps": 3, "cold_start_steps": 1, "dynamic_steps": 1}
    )
    config = DMDRConfig.parse_args(["--config", str(recipe)])
    assert config.pretrained_model_name_or_path == str(testbed.teacher_dir)
    assert config.train_prompts == str(testbed.prompts_file)
    assert config.output_dir == str(tmp_path / "student")
    assert config.image_size == (32, 64) and config.max_train_steps == 3
    (spec,) = [parse_reward_spec(spec) for spec in config.reward]
    assert spec.name == REWARD_CLASS and spec.hinge is None
    assert spec.options["model"] == str(testbed.reward_weights)
    # An explicit reward list replaces the recipe's; the pair reward still gets the testbed's weights.
    values = digits_recipe(testbed, tmp_path, {"reward": [{"name": REWARD_CLASS, "weight": 2.0, "hinge": None}]})
    assert values["reward"] == [
        {"name": REWARD_CLASS, "weight": 2.0, "hinge": None, "model": str(testbed.reward_weights)}
    ]
    assert DIGITS_RECIPE["reward"][0].get("model") is None  # the shared recipe is never mutated


def test_example_yaml_is_the_recipe_in_code():
    assert yaml.safe_load((ROOT / "examples" / "train_dmdr" / "configs" / "digits.yaml").read_text()) == DIGITS_RECIPE


def test_training_runs_the_installed_module_and_nothing_imports_the_checkout():
    command = trainer_command(Path("recipe.yaml"), ["--max_train_steps", "2"])
    assert "accelerate.commands.launch" in command
    assert command[command.index("-m", 3) + 1] == "diffusers_dmdr.train"
    assert command[-4:] == ["--config", "recipe.yaml", "--max_train_steps", "2"]
    # No module of the package reaches into the repository or imports the demo.
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "REPO_ROOT" not in text and "parents[2]" not in text and '"examples" /' not in text, path
        assert "from ..demo" not in text and "from .demo" not in text, path
    # The training program is the package's; the example script only re-exports it.
    from diffusers_dmdr import train

    assert callable(train.main) and callable(train.parse_and_check)


def test_console_scripts_are_declared():
    """setup.py declares both console scripts (read from its source: installed metadata can be stale), and each
    names a function that exists."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text(encoding="utf-8"))
    setup_call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == "setup"
    )
    entry_points = ast.literal_eval(next(kw.value for kw in setup_call.keywords if kw.arg == "entry_points"))
    scripts = dict(line.split("=", 1) for line in entry_points["console_scripts"])
    assert scripts == {"dmdr-train": "diffusers_dmdr.train:cli", "dmdr-export": "diffusers_dmdr.export_cli:main"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_metrics_table_headline_and_training_curves(tmp_path):
    rows = {
        "teacher": {"nfe_per_sample": 100, "guidance_scale": 3.0, "pair_accuracy": 0.61, "fd": 0.8312},
        "student": {"nfe_per_sample": 4, "pair_accuracy": 0.74},
    }
    table = format_table(rows).splitlines()
    assert table[0].startswith("| model | steps | CFG | NFE | pair accuracy")
    assert table[2].startswith("| teacher | - | 3 | 100 | 0.61 |") and "0.831" in table[2]
    assert "+13.0 points" in headline(rows, "teacher", "student") and "meets" in headline(rows, "teacher", "student")
    rows["student"]["pair_accuracy"] = 0.65
    assert "misses" in headline(rows, "teacher", "student")
    history = [{"step": 1, "loss_dmd": 0.5, "stage": 1.0}, {"step": 2, "loss_dmd": 0.4, "reward/x": -0.1}]
    (tmp_path / "train_summary.json").write_text(json.dumps({"history": history}))
    curves = read_training_curves(tmp_path)
    assert curves["loss_dmd"] == ([1, 2], [0.5, 0.4]) and curves["reward/x"] == ([2], [-0.1])


def test_prompts_record_names_both_digits_of_every_prompt():
    records = prompts_record(num_per_pair=3, seed=1000, grid_seed=5000)
    metrics = [record for record in records if record["use"] == "metrics"]
    grid = [record for record in records if record["use"] == "grid"]
    assert len(metrics) == 3 * len(HELD_OUT_PAIRS) and len(grid) == 100
    for record in records:
        assert parse_pair(record["prompt"]) == (record["left"], record["right"])
        assert record["held_out"] == ((record["left"], record["right"]) in HELD_OUT_PAIRS)
    assert [record["noise_seed"] for record in metrics] == list(range(1000, 1000 + len(metrics)))
    assert {(record["left"], record["right"]) for record in grid} == set(ALL_PAIRS)
    assert all(record["held_out"] for record in metrics)


def test_pair_grid_places_every_pair_once_and_marks_the_held_out_ones():
    pairs = torch.tensor(ALL_PAIRS)
    # Each sample's pixels encode its pair, so the grid cell can be checked.
    images = (pairs[:, 0] * 10 + pairs[:, 1]).float()[:, None, None, None].expand(-1, 3, 32, 64) / 100
    samples = DigitSamples(images=images, prompts=pair_prompts()[::4], digits=pairs, seconds=1.0, nfe_per_sample=4)
    grid = pair_grid(samples, border=1)
    assert grid.shape == (3, 10 * 34, 10 * 66)
    for left, right in [(0, 0), (3, 7), (9, 2)]:
        cell = grid[:, left * 34 : (left + 1) * 34, right * 66 : (right + 1) * 66]
        assert torch.allclose(cell[:, 1:-1, 1:-1], torch.tensor((left * 10 + right) / 100))
        red = (left, right) in HELD_OUT_PAIRS
        assert cell[0, 0, 0].item() == pytest.approx(0.9 if red else 0.35)
    with pytest.raises(ValueError, match="every pair"):
        pair_grid(DigitSamples(images[:5], [], pairs[:5], 1.0, 4))
