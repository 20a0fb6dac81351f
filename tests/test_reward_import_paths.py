"""Rewards named by import path run no code from files: checked before anything is called, opt-in for recipes."""

import pytest
import yaml

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.rewards import check_recipe_import_paths, load_rewards, validate_reward_specs
from diffusers_dmdr.rewards.core import reward_import_paths


def write_recipe(tmp_path, rewards, **values) -> str:
    path = tmp_path / "recipe.yaml"
    values = {"pretrained_model_name_or_path": "teacher", "train_prompts": "p.txt", "reward": rewards, **values}
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "os.system", "command": "touch {marker}"},
        {"name": "subprocess.Popen", "args": "touch {marker}", "shell": True},
        {"name": "subprocess.getoutput", "cmd": "touch {marker}"},
        {"name": "classifier", "module": "os.system", "labels": ["a", "b"], "module_options": {"command": "x"}},
    ],
    ids=["os.system", "Popen", "getoutput", "classifier-module"],
)
def test_a_recipe_cannot_run_a_command(tmp_path, spec):
    marker = tmp_path / "payload_ran"
    spec = {key: value.format(marker=marker) if isinstance(value, str) else value for key, value in spec.items()}
    recipe = write_recipe(tmp_path, [spec])
    # Without the opt-in the recipe is refused before anything is imported: first thing in the preflight ...
    with pytest.raises(ValueError, match="pass --allow_reward_import_paths on the command line"):
        check_run_inputs(DMDRConfig.parse_args(["--config", recipe]))
    with pytest.raises(ValueError, match="--allow_reward_import_paths"):
        check_recipe_import_paths(DMDRConfig.from_yaml(recipe))
    # ... and with it, the path is checked before it is called: a command is no reward.
    config = DMDRConfig.parse_args(["--config", recipe, "--allow_reward_import_paths"])
    with pytest.raises(ValueError, match="nothing was called"):
        load_rewards(config.reward, "cpu")
    assert not marker.exists()


def test_a_recipe_cannot_opt_itself_in(tmp_path):
    recipe = write_recipe(tmp_path, ["reward_fixtures.sum_of_pixels_reward"], allow_reward_import_paths=True)
    with pytest.raises(ValueError, match="a recipe cannot allow itself to import code"):
        DMDRConfig.parse_args(["--config", recipe])


def test_trusted_import_paths_still_work(tmp_path):
    recipe = write_recipe(tmp_path, [{"name": "reward_fixtures.sum_of_pixels_reward", "hinge": None}])
    config = DMDRConfig.parse_args(["--config", recipe, "--allow_reward_import_paths"])
    (reward,) = load_rewards(config.reward, "cpu")
    assert reward.name == "sum_of_pixels_reward"
    # Typed on the command line, an import path needs no opt-in; registered rewards never do.
    config = DMDRConfig.parse_args(
        ["--config", write_recipe(tmp_path, ["clip:0.3"]), "--reward", "reward_fixtures.sum_of_pixels_reward"]
    )
    # (The command line's rewards replace the recipe's list.)
    assert config.reward == ["reward_fixtures.sum_of_pixels_reward"]
    assert reward_import_paths("clip:0.3") == []
    assert reward_import_paths("diffusers_dmdr.digits.reward.DigitClassifierReward") == []  # the package's own
    assert reward_import_paths("classifier:module=pkg.Net:labels=a") == ["pkg.Net"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("os.system", "is a builtin_function_or_method but not a reward"),
        ("os.path.join", "is a function but not a reward"),  # (a, *p): one required argument, not (images, prompts)
        ("subprocess.Popen", "is a type but not a reward"),
        ("json.JSONDecoder", "is a type but not a reward"),
        ("classifier:module=subprocess.Popen:labels=a", "not a torch.nn.Module class"),
    ],
)
def test_import_paths_that_are_not_rewards_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_reward_specs([spec])
