"""Issue 27 item 9: the flags diffusers' training scripts have and users type (`--pretrained_vae_model_name_or_path`,
`--lora_dropout`, `--cache_dir`), offline rewards checked before any weight loads, and `build-tiny --reward`.

The Hub is a hand-made Hugging Face cache folder (`models--org--name/refs/main` + `snapshots/<commit>/`), read with
HF_HUB_OFFLINE=1 (tests/conftest.py): what a user with a pre-filled `--cache_dir` and no network has.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_entry_points import assert_one_line, base_argv, run_train
from test_preflight import config_for, prompts  # noqa: F401  (fixtures)

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr import testing as tiny_builders
from diffusers_dmdr.families import get_family
from diffusers_dmdr.hub_cache import hub_cache_kwargs, using_hub_cache_dir
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.rewards import load_rewards, validate_reward_specs
from diffusers_dmdr.testing import build_tiny_reward


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def plant_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as the `main` snapshot of the Hub repository `repo_id` in the cache folder `cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


@pytest.fixture
def vae_teacher(tmp_path):
    """A weightless SDXL teacher (configs only) whose VAE config states its latent space."""
    folder = tmp_path / "teacher"
    vae = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8, 8, 8],
        "latent_channels": 4,
        "scaling_factor": 0.13025,
    }
    for name, config in (("vae", vae), ("unet", {"in_channels": 4})):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return folder


def write_vae_folder(folder: Path, weights: bool = True, variant: str | None = None, **changes) -> Path:
    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8, 8, 8],
        "latent_channels": 4,
        "scaling_factor": 0.13025,
        **changes,
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        suffix = f".{variant}" if variant else ""
        (folder / f"diffusion_pytorch_model{suffix}.safetensors").write_bytes(b"")
    return folder


# --- --pretrained_vae_model_name_or_path: refused in one line before any weight loads ---------------------------------
@pytest.mark.parametrize(
    "make_vae, extra, message",
    [
        (lambda root: root / "missing", [], "--pretrained_vae_model_name_or_path {vae} does not exist"),
        (lambda root: root / "teacher", [], "it is not a VAE folder (it is a pipeline folder: give"),
        (
            lambda root: write_vae_folder(root / "vae16", latent_channels=16),
            [],
            "has another latent space than the teacher's VAE: latent_channels 16 (teacher's VAE: 4)",
        ),
        (
            lambda root: write_vae_folder(root / "scaled", scaling_factor=0.18215),
            [],
            "scaling_factor 0.18215 (teacher's VAE: 0.13025)",
        ),
        (
            lambda root: write_vae_folder(root / "deep", block_out_channels=[8, 8, 8]),
            [],
            "spatial factor 4 (teacher's VAE: 8)",
        ),
        (
            lambda root: write_vae_folder(root / "tiny", _class_name="AutoencoderTiny"),
            [],
            "is a AutoencoderTiny but the teacher's VAE is a AutoencoderKL",
        ),
        (
            lambda root: write_vae_folder(root / "plain"),
            ["--variant", "fp16"],
            "has no diffusion_pytorch_model.fp16.safetensors: --variant fp16 applies to the VAE too",
        ),
        (
            lambda root: write_vae_folder(root / "empty", weights=False),
            [],
            "has no diffusion_pytorch_model.safetensors",
        ),
    ],
)
def test_a_bad_vae_is_one_line_before_any_weight_loads(vae_teacher, prompts, capsys, make_vae, extra, message):  # noqa: F811
    vae = make_vae(vae_teacher.parent)
    argv = base_argv(vae_teacher, prompts) + ["--pretrained_vae_model_name_or_path", str(vae), *extra]
    status, err = run_train(argv, capsys)
    assert status == 2
    assert_one_line(err, message.format(vae=vae))


def test_a_vae_of_the_teachers_latent_space_passes_with_its_variant(vae_teacher, prompts):  # noqa: F811
    vae = write_vae_folder(vae_teacher.parent / "fp16-fix", variant="fp16", force_upcast=False)
    config = config_for(vae_teacher, prompts, pretrained_vae_model_name_or_path=str(vae), variant="fp16")
    assert check_run_inputs(config).family.name == "sdxl"


def test_a_relative_vae_folder_is_recorded_absolute(vae_teacher, prompts, monkeypatch):  # noqa: F811
    """As the teacher's: `dmdr-export` and `evaluate` reload the run's VAE from any folder."""
    write_vae_folder(vae_teacher.parent / "fp16-fix")
    monkeypatch.chdir(vae_teacher.parent)
    config = config_for(vae_teacher, prompts, pretrained_vae_model_name_or_path="fp16-fix")
    check_run_inputs(config)
    assert config.pretrained_vae_model_name_or_path == str(vae_teacher.parent.resolve() / "fp16-fix")


def test_a_key_a_vae_config_omits_has_the_class_default(vae_teacher, prompts):  # noqa: F811
    """Configs saved by older diffusers omit `scaling_factor`: AutoencoderKL's default 0.18215 is SD1.5's, not
    SDXL's 0.13025 (the teacher's)."""
    old = write_vae_folder(vae_teacher.parent / "old")
    config_file = old / "config.json"
    config_file.write_text(
        json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "scaling_factor"})
    )
    with pytest.raises(ValueError, match=r"scaling_factor 0.18215 \(teacher's VAE: 0.13025\)"):
        check_run_inputs(config_for(vae_teacher, prompts, pretrained_vae_model_name_or_path=str(old)))
    teacher_config = vae_teacher / "vae" / "config.json"
    teacher_config.write_text(json.dumps({**json.loads(teacher_config.read_text()), "scaling_factor": 0.18215}))
    check_run_inputs(config_for(vae_teacher, prompts, pretrained_vae_model_name_or_path=str(old)))


def test_a_hub_vae_not_in_the_offline_cache_is_one_line(vae_teacher, prompts, capsys, tmp_path):  # noqa: F811
    argv = base_argv(vae_teacher, prompts) + ["--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"]
    status, err = run_train(argv + ["--cache_dir", str(tmp_path / "empty-cache")], capsys)
    assert status == 2
    assert_one_line(err, "Could not read config.json of --pretrained_vae_model_name_or_path 'madebyollin/sdxl-vae")
    assert "--cache_dir" in err


# --- --lora_dropout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1) (0: no dropout), got 1.0"),
        (["--lora_dropout", "-0.1"], "--lora_dropout must be in [0, 1)"),
        (["--lora_dropout", "nan"], "--lora_dropout must be in [0, 1)"),
        (["--lora_dropout", "0.1", "--training_mode", "full"], "--training_mode full trains no student LoRA"),
        (["--cache_dir", "{prompts}"], "--cache_dir {prompts} is a file"),
    ],
)
def test_bad_dropout_and_cache_values_are_one_line(vae_teacher, prompts, capsys, extra, message):  # noqa: F811
    extra = [value.format(prompts=prompts) for value in extra]
    status, err = run_train(base_argv(vae_teacher, prompts) + extra, capsys)
    assert status == 2
    assert_one_line(err, message.format(prompts=prompts))


def test_lora_dropout_reaches_the_student_adapter_only_and_drops_in_train_mode(tiny_teacher_dirs, tmp_path):
    from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
    from diffusers_dmdr.training_module import build_training_module

    config = DMDRConfig(
        pretrained_model_name_or_path=tiny_teacher_dirs["sdxl"],
        train_prompts="unused.txt",
        lora_rank=4,
        fake_lora_rank=4,
        lora_dropout=0.5,
    )
    teacher = get_family("sdxl").load_run_teacher(config)
    module = build_training_module(teacher, config, torch.float32)
    peft_config = module.backbone.peft_config
    assert peft_config[STUDENT_ADAPTER].lora_dropout == 0.5 and peft_config[FAKE_ADAPTER].lora_dropout == 0.0
    with torch.no_grad():  # B starts at zero: give the adapter an effect, or dropout changes nothing
        for name, parameter in module.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    sample = torch.randn(1, 4, 8, 8)
    condition = {
        "encoder_hidden_states": torch.randn(1, 16, 64),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64.0]])},
    }

    def student(mode: str) -> torch.Tensor:
        module.train(mode == "train")
        return module("student", sample, torch.tensor([500]), condition)

    assert torch.equal(student("eval"), student("eval"))
    torch.manual_seed(0)
    first = student("train")
    assert not torch.equal(first, student("train"))  # dropout is active while training
    module.train(True)
    fake = [module("guidance", sample, torch.tensor([500]), condition) for _ in range(2)]
    assert torch.equal(*fake)  # the fake-score adapter never drops out


# --- --cache_dir, a local Hub cache, a tiny reward: one offline smoke run --------------------------------------------
@pytest.fixture
def hub_cache(tiny_teacher_dirs, tmp_path):
    """A Hugging Face cache holding a tiny SDXL teacher, another VAE for it and a tiny CLIP reward, under Hub ids."""
    from diffusers import AutoencoderKL

    cache = tmp_path / "hf-cache"
    plant_in_hub_cache(cache, "dmdr-tests/tiny-sdxl", Path(tiny_teacher_dirs["sdxl"]))
    vae = AutoencoderKL.from_pretrained(tiny_teacher_dirs["sdxl"], subfolder="vae")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    vae.save_pretrained(tmp_path / "vae-fix", safe_serialization=True)
    plant_in_hub_cache(cache, "dmdr-tests/tiny-sdxl-vae-fix", tmp_path / "vae-fix")
    plant_in_hub_cache(cache, "dmdr-tests/tiny-clip", build_tiny_reward("clip", tmp_path / "tiny-clip"))
    return cache


def test_cache_dir_reaches_every_hub_read_of_preflight_and_loading(hub_cache, prompts, capsys):  # noqa: F811
    argv = [
        "--pretrained_model_name_or_path",
        "dmdr-tests/tiny-sdxl",
        "--train_prompts",
        str(prompts),
        "--resolution",
        "64",
        "--reward",
        "clip:model=dmdr-tests/tiny-clip",
    ]
    # Without --cache_dir the offline run finds nothing: one line, before any weight loads.
    status, err = run_train(argv, capsys)
    assert status == 2 and "dmdr-tests/tiny-sdxl" in err
    assert_one_line(err, "Could not read model_index.json of 'dmdr-tests/tiny-sdxl'")
    config = DMDRConfig.parse_args(argv + ["--cache_dir", str(hub_cache)])
    plan = check_run_inputs(config)
    assert plan.family.name == "sdxl" and hub_cache_kwargs() == {}  # the preflight's cache folder is its own
    config.pretrained_vae_model_name_or_path = "dmdr-tests/tiny-sdxl-vae-fix"
    check_run_inputs(config)
    teacher = plan.family.load_run_teacher(config)
    fixed_vae = load_file(next((hub_cache / "models--dmdr-tests--tiny-sdxl-vae-fix").rglob("*.safetensors")))
    assert all(torch.equal(teacher.vae.state_dict()[key], value) for key, value in fixed_vae.items())
    with using_hub_cache_dir(str(hub_cache)):
        (reward,) = load_rewards(config.reward, "cpu")
    assert reward.name == "clip"


def test_offline_smoke_run_with_a_tiny_reward_another_vae_and_lora_dropout(hub_cache, prompts, tmp_path):  # noqa: F811
    """`dmdr-train` from Hub ids in the cache only: stage 2 trains on the tiny CLIP reward, the student LoRA drops
    out, and the export ships the VAE the samples were decoded with and the adapter config with the dropout."""
    from diffusers_dmdr import train

    output = tmp_path / "run"
    train.main(
        [
            "--pretrained_model_name_or_path=dmdr-tests/tiny-sdxl",
            "--pretrained_vae_model_name_or_path=dmdr-tests/tiny-sdxl-vae-fix",
            f"--cache_dir={hub_cache}",
            f"--train_prompts={prompts}",
            f"--output_dir={output}",
            "--reward=clip:0.5:model=dmdr-tests/tiny-clip",
            "--lora_dropout=0.1",
            "--resolution=64",
            "--max_train_steps=2",
            "--cold_start_steps=1",
            "--update_ratio=1",
            "--lora_rank=4",
            "--fake_lora_rank=4",
            "--checkpointing_steps=2",
            "--validation_steps=0",
            "--report_to=none",
            "--base_model=dmdr-tests/tiny-sdxl",
        ]
    )
    summary = json.loads((output / "train_summary.json").read_text())
    assert "reward/clip" in summary["history"][-1]
    fixed_vae = load_file(next((hub_cache / "models--dmdr-tests--tiny-sdxl-vae-fix").rglob("*.safetensors")))
    exported_vae = load_file(output / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_vae[key], value) for key, value in fixed_vae.items())
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        adapter_config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert adapter_config["unet.lora_dropout"] == 0.1 and adapter_config["unet.r"] == 4
    card = (output / "README.md").read_text()
    assert "dropout 0.1" in card and "`dmdr-tests/tiny-sdxl-vae-fix` instead of the teacher's" in card
    # `dmdr-export` of the checkpoint reloads the teacher with the run's VAE, through the run's cache folder.
    from diffusers_dmdr.export import export_checkpoint

    again = export_checkpoint(output / "checkpoint-2", tmp_path / "re-export")
    exported_vae = load_file(again / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported_vae[key], value) for key, value in fixed_vae.items())


# --- offline rewards: refused before any weight loads ----------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, message",
    [
        ("pickscore", "Reward 'pickscore': model=yuvalkirstain/PickScore_v1 is a Hub repository that is not in"),
        ("aesthetic", "Reward 'aesthetic': model=trl-lib/ddpo-aesthetic-predictor is a Hub repository"),
        ("clip:model=dmdr-tests/not-cached", "Reward 'clip': model=dmdr-tests/not-cached is a Hub repository"),
    ],
)
def test_offline_rewards_not_in_the_cache_fail_before_the_teacher_loads(vae_teacher, prompts, capsys, spec, message):  # noqa: F811
    status, err = run_train(base_argv(vae_teacher, prompts) + ["--reward", spec], capsys)
    assert status == 2
    assert_one_line(err, message)
    assert "HF_HUB_OFFLINE=1" in err and "hf download" in err


def test_aesthetic_checks_its_clip_model_too(tmp_path):
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    with pytest.raises(ValueError, match="Reward 'aesthetic': clip_model=openai/clip-vit-large-patch14 is a Hub"):
        validate_reward_specs([f"aesthetic:model={head}"])


def test_pickscore_takes_a_local_models_own_tokenizer(tmp_path):
    """`pickscore:model=<local folder>` loads offline: the tokenizer and image processor come from that folder (they
    came from the Hub's CLIP-H repository unless `processor=` was given)."""
    folder = build_tiny_reward("clip", tmp_path / "pickscore")
    (reward,) = load_rewards([f"pickscore:model={folder}"], "cpu")
    assert reward.fn.reward.towers.tokenizer.model_max_length == 16
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, weights_only / name)
    with pytest.raises(ValueError, match=r"has no tokenizer .* give processor="):
        validate_reward_specs([f"pickscore:model={weights_only}"])
    validate_reward_specs([f"pickscore:model={weights_only}:processor={folder}"])


# --- build-tiny --reward ---------------------------------------------------------------------------------------------
def test_build_tiny_writes_a_reward_that_clip_loads(tmp_path, capsys):
    tiny_builders.main(["build-tiny", "--reward", "clip", "--output", str(tmp_path / "clip")])
    out = capsys.readouterr().out
    assert f"--reward clip:model={tmp_path / 'clip'}" in out
    assert (tmp_path / "clip" / "model.safetensors").is_file() and not list((tmp_path / "clip").glob("*.bin"))
    (reward,) = load_rewards([f"clip:model={tmp_path / 'clip'}"], "cpu")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward.fn(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(SystemExit):
        tiny_builders.main(["build-tiny", "--reward", "clip", "--family", "sdxl", "--output", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cache_dir_reaches_a_hub_prompt_dataset(monkeypatch, tmp_path):
    """A Hub prompt dataset is read through `--cache_dir` too (as diffusers' scripts pass it to `load_dataset`)."""
    import datasets

    from diffusers_dmdr.data import load_prompts

    seen = {}

    def load_dataset(*args, **kwargs):
        seen.update(kwargs)
        return datasets.Dataset.from_dict({"prompt": ["a cat"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with using_hub_cache_dir(str(tmp_path / "hf")):
        assert load_prompts("dmdr-tests/prompts") == ["a cat"]
    assert seen["cache_dir"] == str(tmp_path / "hf")
    seen.clear()
    load_prompts("dmdr-tests/prompts")
    assert "cache_dir" not in seen
