"""The model card built from a `ModelCardInfo` alone (no weights): what it claims, how it prints the recipe, and the
snippets' dtypes and stock schedulers; and the `dmdr-export` flags."""

import logging
import re

import pytest
from conftest import tiny_config

from diffusers_dmdr.export_cli import build_argument_parser
from diffusers_dmdr.families import get_family
from diffusers_dmdr.model_card import (
    BASE_MODEL_PLACEHOLDER,
    ModelCardInfo,
    make_model_card,
)
from diffusers_dmdr.pipelines import DMDRScheduler


SDXL_GRID = [999.0, 749.0, 499.0, 249.0]


def card_text(tmp_path, family="sdxl", grid=SDXL_GRID, scheduler=None, base_model=None, **overrides) -> str:
    teacher = tmp_path / "teacher"
    teacher.mkdir(exist_ok=True)
    config = tiny_config(str(teacher), "prompts.txt", tmp_path / "out", validation_prompts=["a red cat"], **overrides)
    if scheduler is None:
        prediction = "flow" if get_family(family).is_flow else "epsilon"
        scheduler = DMDRScheduler(prediction_type=prediction, training_timesteps=grid)
    info = ModelCardInfo(config, get_family(family), scheduler, repo_id="org/student", base_model=base_model)
    return make_model_card(info).text


def snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_intro_and_recipe_claim_rewards_only_for_a_run_trained_on_one(tmp_path):
    dmd_only = card_text(tmp_path, reward=[])
    intro = dmd_only.split("\n## ", 1)[0]
    assert "reinforcement learning" not in intro and "trained on no reward" in intro
    assert "no reward loss was applied" in dmd_only and "stage 2 adds the reward losses" not in dmd_only
    # A zero-weight reward is logged, not trained on.
    assert "reinforcement learning" not in card_text(tmp_path, reward=["clip:0"]).split("\n## ", 1)[0]
    with_reward = card_text(tmp_path, reward=["clip:0.3"])
    assert "jointly with reinforcement learning" in with_reward.split("\n## ", 1)[0]
    assert "stage 2 adds the reward losses" in with_reward


def test_yaml_rewards_print_in_their_command_line_form(tmp_path):
    text = card_text(tmp_path, reward=[{"name": "clip", "weight": 0.3}], eval_reward=[{"name": "pickscore"}])
    assert "{'name'" not in text and "`clip:0.3:hinge=0.7`" in text and "`pickscore:1.0:hinge=none`" in text


@pytest.mark.parametrize(
    ("family", "mixed_precision", "expected"),
    [("sd3", "bf16", "torch.bfloat16"), ("sd3", None, "torch.bfloat16"), ("sdxl", "fp16", "torch.float16")],
)
def test_snippets_load_in_the_runs_precision_with_dtype(tmp_path, family, mixed_precision, expected):
    grid = [1000.0, 750.0] if family == "sd3" else SDXL_GRID
    text = card_text(tmp_path, family=family, grid=grid, mixed_precision=mixed_precision)
    other = {"torch.bfloat16": "torch.float16", "torch.float16": "torch.bfloat16"}[expected]
    for code in snippets(text):
        assert f'("cuda", {expected})' in code and other not in code
        # diffusers 0.42 deprecates `torch_dtype`.
        assert "torch_dtype" not in code and "dtype=dtype" in code


def test_lcm_route_sets_the_trained_grid_without_a_diffusers_warning(tmp_path):
    """Route 3 is the scheduler's stock recipe; the LCM it builds takes the trained timesteps without warning (the
    default `original_inference_steps=50` schedule misses 749 and warns)."""
    import diffusers

    scheduler = DMDRScheduler(prediction_type="epsilon", training_timesteps=SDXL_GRID)
    recipe = scheduler.stock_scheduler_recipe()
    route_3 = snippets(card_text(tmp_path, scheduler=scheduler))[2]
    kwargs = "".join(f", {key}={value!r}" for key, value in recipe["from_config_kwargs"].items())
    assert f"{recipe['class_name']}.from_config(pipe.scheduler.config{kwargs})" in route_3
    assert "timesteps=[999, 749, 499, 249]" in route_3

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        stock_class = getattr(diffusers, recipe["class_name"])
        stock_class(**recipe["from_config_kwargs"]).set_timesteps(**recipe["call_kwargs"])
        assert messages == []
        diffusers.LCMScheduler().set_timesteps(timesteps=[999, 749, 499, 249])
        assert any("not on the original" in message for message in messages)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


def test_stock_route_follows_the_schedulers_own_recipe(tmp_path):
    class WithRecipe(DMDRScheduler):
        recipe = None

        def stock_scheduler_recipe(self):
            return self.recipe

    scheduler = WithRecipe(prediction_type="epsilon", training_timesteps=SDXL_GRID)
    WithRecipe.recipe = {
        "class_name": "TCDScheduler",
        "from_config_kwargs": {"original_inference_steps": 4},
        "call_kwargs": {"timesteps": [999, 749, 499, 249]},
    }
    route_3 = snippets(card_text(tmp_path, scheduler=scheduler))[2]
    assert "from diffusers import TCDScheduler, StableDiffusionXLPipeline" in route_3
    assert "TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=4)" in route_3
    WithRecipe.recipe["exact"], WithRecipe.recipe["note"] = True, ""
    assert "reproduces the trained sampler up to float rounding" in card_text(tmp_path, scheduler=scheduler)
    WithRecipe.recipe = {"class_name": None, "from_config_kwargs": {}, "call_kwargs": {}, "note": "no stock DDIM"}
    text = card_text(tmp_path, scheduler=scheduler)
    assert len(snippets(text)) == 2 and "No stock diffusers scheduler follows this student's sampler" in text
    assert "(no stock DDIM)" in text


def test_a_local_teacher_without_base_model_gets_a_placeholder_and_says_so(tmp_path):
    text = card_text(tmp_path)
    assert "its Hub id was not given" in text and "--base_model org/name" in text
    assert str(tmp_path) not in "".join(snippets(text))
    assert all(f'"{BASE_MODEL_PLACEHOLDER}"' in code for code in snippets(text)[2:])
    named = card_text(tmp_path, base_model="org/teacher")
    assert "[`org/teacher`](https://huggingface.co/org/teacher)" in named and BASE_MODEL_PLACEHOLDER not in named


def test_base_model_must_be_a_hub_id():
    from diffusers_dmdr import DMDRConfig

    with pytest.raises(ValueError, match="--base_model"):
        DMDRConfig(pretrained_model_name_or_path="org/teacher", train_prompts="p.txt", base_model="/tmp")


def test_export_cli_boolean_flags_read_like_train_py():
    parser = build_argument_parser()
    required = ["--checkpoint", "c", "--output_dir", "o"]
    args = parser.parse_args(required + ["--export_full_pipeline", "false", "--push_to_hub", "no", "--hub_private"])
    assert (args.export_full_pipeline, args.push_to_hub, args.hub_private) == (False, False, True)
    args = parser.parse_args(required + ["--export_full_pipeline", "--push_to_hub", "1", "--hub_private", "off"])
    assert (args.export_full_pipeline, args.push_to_hub, args.hub_private) == (True, True, False)
    # Unset: the run's own settings.
    assert parser.parse_args(required).export_full_pipeline is None
    with pytest.raises(SystemExit):
        parser.parse_args(required + ["--export_full_pipeline", "maybe"])


def test_setup_py_names_the_source_repository():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text(encoding="utf-8"))
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    keywords = {
        keyword.arg: ast.literal_eval(keyword.value)
        for keyword in call.keywords
        if keyword.arg in ("url", "project_urls")
    }
    assert keywords["url"] == "https://github.com/diffusers-dmdr/diffusers-dmdr"
    assert keywords["project_urls"]["Source"] == keywords["url"]


def test_the_card_template_ships_in_the_package():
    """The card is rendered from a template inside the package; setup.py's package_data puts it in the wheel."""
    import ast
    from fnmatch import fnmatch
    from importlib import resources
    from pathlib import Path

    from diffusers_dmdr.model_card import CARD_TEMPLATE

    assert (resources.files("diffusers_dmdr") / "templates" / CARD_TEMPLATE).is_file()
    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text(encoding="utf-8"))
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    package_data = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "package_data")
    assert any(fnmatch(f"templates/{CARD_TEMPLATE}", pattern) for pattern in package_data["diffusers_dmdr"])
