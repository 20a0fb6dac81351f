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
    """The training program (`diffusers_dmdr.train`; examples/train_dmdr/train.py only runs it from a checkout)."""
    return importlib.import_module("diffusers_dmdr.train")


@pytest.fixture
def weightless_teacher(tmp_path):
    folder = tmp_path / "teacher"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
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
    (weightless_teacher / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="'WanPipeline' pipeline, which diffusers-dmdr does not support"):
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


def test_a_bug_in_the_preflight_keeps_its_traceback(weightless_teacher, prompts, monkeypatch):
    """Only the project's own input checks become one line: a ValueError from a builtin is a bug and propagates."""
    train = load_train_script()

    def buggy_preflight(config):
        return int("not a number")  # a builtin's ValueError, as a bug would raise it

    monkeypatch.setattr(train, "check_run_inputs", buggy_preflight)
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    with pytest.raises(ValueError, match="invalid literal for int"):
        train.parse_and_check(argv)
    assert not train.is_checked_input_error(ValueError("constructed, never raised"))


def test_bad_input_in_the_script_is_one_message_and_exit_status_2(weightless_teacher, prompts, capsys):
    train = load_train_script()
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    cases = [
        (["--max_train_steps", "5", "--cold_start_steps", "10"], "longer than --max_train_steps"),
        # The script stops at the preflight check, before trying to load the (absent) weights.
        (["--resolution", "100", "--max_train_steps", "5"], "not divisible by the VAE's factor"),
        (["--report_to", "wandb"], "pip install wandb"),
        (["--student_init_path", str(prompts.parent / "missing.safetensors")], "--student_init_path"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv + extra)
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err
        assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_report_to_wandb_without_wandb_names_the_install(weightless_teacher, prompts, monkeypatch):
    import diffusers_dmdr.preflight as preflight

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install wandb"):
        check_run_inputs(config_for(weightless_teacher, prompts, report_to="wandb"))
    check_run_inputs(config_for(weightless_teacher, prompts, report_to="all"))


def test_reward_autoencoder_on_the_hub_is_checked_with_its_own_revision(weightless_teacher, prompts, monkeypatch):
    from diffusers import AutoencoderTiny

    seen = {}

    def load_config(name, revision=None, **kwargs):
        seen.update(name=name, revision=revision)
        raise OSError("offline")

    monkeypatch.setattr(AutoencoderTiny, "load_config", load_config)
    config = config_for(
        weightless_teacher,
        prompts,
        revision="teacher-rev",
        reward_vae_model_name_or_path="madebyollin/taesdxl",
        reward_vae_revision="vae-rev",
    )
    with pytest.raises(FileNotFoundError, match="--reward_vae_revision"):
        check_run_inputs(config)
    assert seen == {"name": "madebyollin/taesdxl", "revision": "vae-rev"}


def test_student_init_path_kind_must_fit_the_training_mode(weightless_teacher, prompts, tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "student_lora.safetensors"
    save_file({"conv.lora_A.weight": torch.zeros(8, 3), "conv.lora_B.weight": torch.zeros(3, 8)}, lora)
    backbone = tmp_path / "unet.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, backbone)
    pickle_file = tmp_path / "unet.bin"
    pickle_file.write_bytes(b"not read")
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    cases = [
        (dict(student_init_path=str(lora), training_mode="full"), ValueError, "is a LoRA"),
        (dict(student_init_path=str(lora), lora_rank=4), ValueError, "set --lora_rank 8"),
        (dict(student_init_path=str(backbone)), ValueError, "use --training_mode full"),
        (dict(student_init_path=str(pickle_file), training_mode="full"), ValueError, "only .safetensors"),
        (dict(student_init_path=str(empty_folder), training_mode="full"), FileNotFoundError, "no .safetensors"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            check_run_inputs(config_for(weightless_teacher, prompts, **overrides))
    check_run_inputs(config_for(weightless_teacher, prompts, student_init_path=str(lora), lora_rank=8))
    check_run_inputs(config_for(weightless_teacher, prompts, student_init_path=str(backbone), training_mode="full"))


def test_reward_models_load_in_the_weight_dtype(weightless_teacher, prompts, tmp_path, monkeypatch):
    """`--mixed_precision bf16`: the frozen reward models are built in bf16 unless a spec sets `precision=`."""
    import logging
    import types

    import torch

    train = load_train_script()
    seen = {}

    class Loaded(Exception):
        pass

    def load_rewards(specs, device, dtype=torch.float32, for_training=True):
        seen["dtype"] = dtype
        raise Loaded

    plan = check_run_inputs(config_for(weightless_teacher, prompts))
    monkeypatch.setattr(plan.family, "load_teacher", lambda *args: None)
    monkeypatch.setattr(train, "check_run_inputs", lambda config: plan)
    monkeypatch.setattr(train, "load_rewards", load_rewards)
    # accelerate's state is a process-wide singleton: a stand-in accelerator keeps other tests' precision intact.
    accelerator = types.SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu"), is_main_process=True)
    monkeypatch.setattr(train, "create_accelerator", lambda config: accelerator)
    monkeypatch.setattr(train, "logger", logging.getLogger("train_dmdr"))
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    with pytest.raises(Loaded):
        train.main(argv + ["--mixed_precision", "bf16", "--report_to", "none", "--output_dir", str(tmp_path / "o")])
    assert seen["dtype"] == torch.bfloat16
