"""Bad input fails before any weight is loaded, with a message that names the fix.

The teacher here is a folder holding only `model_index.json` and `vae/config.json`: no weights at all, so a check
that passes would reach the loader and fail differently; each test asserts the preflight message instead.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.preflight import check_run_inputs


ROOT = Path(__file__).resolve().parents[1]


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_dmdr", ROOT / "examples" / "train_dmdr" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def weightless_teacher(tmp_path):
    folder = tmp_path / "teacher"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n")
    return path


def config_for(teacher, prompts, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(teacher),
        train_prompts=str(prompts),
        resolution=64,
        max_train_steps=2,
        cold_start_steps=1,
        report_to="none",
    )
    return DMDRConfig(**{**values, **overrides})


def test_valid_inputs_pass_without_weights(weightless_teacher, prompts):
    plan = check_run_inputs(config_for(weightless_teacher, prompts))
    assert plan.family.name == "sdxl"
    assert plan.student_timesteps == [999.0, 749.0, 499.0, 249.0]
    assert plan.prompts == ["a cat", "a dog"]


def test_one_step_sdxl_uses_timestep_399(weightless_teacher, prompts):
    assert check_run_inputs(config_for(weightless_teacher, prompts, num_student_steps=1)).student_timesteps == [399.0]


def test_missing_model_path(tmp_path, prompts):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_run_inputs(config_for(tmp_path / "nowhere", prompts))


def test_folder_without_model_index(tmp_path, prompts):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        check_run_inputs(config_for(tmp_path, prompts))


def test_unsupported_family(weightless_teacher, prompts):
    (weightless_teacher / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline' pipeline, which diffusers-dmdr does not support"):
        check_run_inputs(config_for(weightless_teacher, prompts))


def test_family_mismatch(weightless_teacher, prompts):
    with pytest.raises(ValueError, match="does not match the teacher, which is a sdxl pipeline"):
        check_run_inputs(config_for(weightless_teacher, prompts, family="sd3"))


def test_resolution_not_divisible_by_vae_factor(weightless_teacher, prompts):
    with pytest.raises(ValueError, match="not divisible by the VAE's factor 8; use e.g. 64 or 72"):
        check_run_inputs(config_for(weightless_teacher, prompts, resolution=68))


def test_increasing_student_timesteps(weightless_teacher, prompts):
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_run_inputs(config_for(weightless_teacher, prompts, num_student_steps=2, student_timesteps=[249, 999]))


def test_empty_prompt_file(weightless_teacher, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(ValueError, match="contains no non-empty prompts"):
        check_run_inputs(config_for(weightless_teacher, empty))


def test_missing_prompt_file(weightless_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_run_inputs(config_for(weightless_teacher, tmp_path / "missing.txt"))


def test_missing_prompt_column(weightless_teacher, tmp_path):
    table = tmp_path / "prompts.csv"
    table.write_text("caption,score\na cat,1\n")
    with pytest.raises(ValueError, match="no column 'prompt'.*Pass --prompt_column"):
        check_run_inputs(config_for(weightless_teacher, table))
    assert check_run_inputs(config_for(weightless_teacher, table, prompt_column="caption")).prompts == ["a cat"]


def test_jsonl_and_parquet_prompts(weightless_teacher, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert check_run_inputs(config_for(weightless_teacher, jsonl)).prompts == ["a cat", "a dog"]
    import datasets

    parquet = tmp_path / "prompts.parquet"
    datasets.Dataset.from_dict({"prompt": ["a fox"]}).to_parquet(str(parquet))
    assert check_run_inputs(config_for(weightless_teacher, parquet)).prompts == ["a fox"]


def test_unsupported_prompt_file_type(weightless_teacher, tmp_path):
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        check_run_inputs(config_for(weightless_teacher, path))


def test_offline_hub_dataset_fails_fast(weightless_teacher):
    with pytest.raises(ValueError, match="neither a local file nor a loadable Hub dataset"):
        check_run_inputs(config_for(weightless_teacher, "someone/prompt-dataset"))


def test_unknown_reward_name(weightless_teacher, prompts):
    with pytest.raises(ValueError, match="no_such_reward"):
        check_run_inputs(config_for(weightless_teacher, prompts, reward=["no_such_reward:0.3"]))


def test_missing_reward_autoencoder(weightless_teacher, prompts, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an AutoencoderTiny folder"):
        check_run_inputs(
            config_for(weightless_teacher, prompts, reward_vae_model_name_or_path=str(tmp_path / "taesd"))
        )


def test_reward_only_training_needs_a_reward(weightless_teacher, prompts):
    with pytest.raises(ValueError, match="nothing to train the student on"):
        check_run_inputs(config_for(weightless_teacher, prompts, dmd_loss_weight=0.0))
    with pytest.raises(ValueError, match="give at least one --reward"):
        check_run_inputs(config_for(weightless_teacher, prompts, reward_tilt=True))


def test_cold_start_longer_than_training_fails_in_the_script(weightless_teacher, prompts):
    train = load_train_script()
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    with pytest.raises(ValueError, match="longer than --max_train_steps"):
        train.main(argv + ["--max_train_steps", "5", "--cold_start_steps", "10"])
    # The script stops at the preflight check, before trying to load the (absent) weights.
    with pytest.raises(ValueError, match="not divisible by the VAE's factor"):
        train.main(argv + ["--resolution", "100", "--max_train_steps", "5", "--cold_start_steps", "5"])
