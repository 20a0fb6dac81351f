"""Wan (text-to-video): the family reproduces the stock `WanPipeline` (conditioning, timestep convention, per-token
timesteps of Wan 2.2 TI2V-5B, negative prompt, CFG rule, decode), trains on 5-D latents, refuses bad frame counts,
sizes and two-expert checkpoints before any weight loads, and exports a student that `WanPipeline` runs."""

import json

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr import testing
from diffusers_dmdr.families import detect_family, get_family, read_teacher_config
from diffusers_dmdr.method.denoisers import Denoiser
from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler, shifted_flow_grid


PROMPTS = ["a red cat", "a blue dog in the snow"]
# The tiny teachers of `wan_dirs` (conftest.py): Wan 2.1 T2V's layout and Wan 2.2 TI2V-5B's.
VARIANTS = ["2.1", "2.2-ti2v"]
# The smallest size each tiny variant's stock pipeline takes (VAE factor x 2x2 patches), and a short clip.
SIZES = {"2.1": 32, "2.2-ti2v": 64}
NUM_FRAMES = 5


def wan_config(teacher_dir, prompt_file, output_dir, variant="2.1", **overrides):
    values = dict(resolution=SIZES[variant], num_frames=NUM_FRAMES, real_guidance_scale=3.0)
    values.update(overrides)
    return tiny_config(teacher_dir, prompt_file, output_dir, **values)


def test_build_tiny_cli_writes_a_teacher_that_diffusers_loads(tmp_path, capsys):
    from diffusers import DiffusionPipeline, WanPipeline

    output = tmp_path / "wan"
    testing.main(["build-tiny", "--family", "wan", "--output", str(output), "--wan_variant", "2.2-ti2v"])
    assert "wrote a tiny wan pipeline" in capsys.readouterr().out
    pipeline = DiffusionPipeline.from_pretrained(output)
    assert isinstance(pipeline, WanPipeline) and pipeline.config.expand_timesteps
    assert pipeline.vae_scale_factor_spatial == 16 and pipeline.vae_scale_factor_temporal == 4
    assert detect_family(read_teacher_config(str(output)), str(output)) == "wan"
    with pytest.raises(SystemExit):
        testing.main(["build-tiny", "--family", "sdxl", "--output", str(tmp_path / "x"), "--wan_variant", "2.1"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_two_stock_sampling_steps_equal_the_family_through_the_trainers_denoiser(variant, guidance_scale, wan_dirs):
    """The stock WanPipeline loop (its CFG rule at `guidance_scale`, empty negative prompt, per-token timesteps for
    TI2V-5B) against the family's encode, backbone call and `real_score_x0` (what the trainer's real score calls)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = get_family("wan")
    teacher = family.load_teacher(wan_dirs[variant])
    pipeline, backbone = teacher.pipeline, teacher.backbone.eval()
    assert family.expand_timesteps == (variant != "2.1")
    # A plain Euler scheduler: the stock loop then takes Euler steps between its sigmas.
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    size = SIZES[variant]
    config = wan_config(wan_dirs[variant], "unused", "unused", variant)
    shape = family.run_latent_shape(backbone, pipeline, config)
    latent_size = size // pipeline.vae_scale_factor_spatial
    # 5 frames are 2 latent frames for the temporal factor 4 (the stock `prepare_latents` shape).
    assert shape == (backbone.config.in_channels, 2, latent_size, latent_size)
    noise = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(3))
    stock = pipeline(
        list(PROMPTS),
        height=size,
        width=size,
        num_frames=NUM_FRAMES,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        latents=noise.clone(),
        output_type="latent",
    ).frames
    levels = pipeline.scheduler.sigmas.tolist()

    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 500.0])
    denoiser = Denoiser(lambda s, t, c: family.call_backbone(backbone, s, t, c), scheduler)
    condition = family.encode_prompts(pipeline, PROMPTS, size, torch.device("cpu"))
    uncondition = family.encode_prompts(pipeline, [family.negative_prompt] * len(PROMPTS), size, torch.device("cpu"))
    sample = noise
    with torch.no_grad():
        for level, next_level in zip(levels[:-1], levels[1:], strict=True):
            batch_level = torch.full((len(PROMPTS),), level)
            x0 = family.real_score_x0(denoiser, sample, batch_level, condition, uncondition, guidance_scale)
            sample = sample + (next_level - level) * (sample - x0) / level
    torch.testing.assert_close(sample, stock, atol=1e-4, rtol=1e-4)
    # The decode is the stock one (per-channel de-normalisation): the same video for the same latents.
    stock_video = pipeline(
        list(PROMPTS),
        height=size,
        width=size,
        num_frames=NUM_FRAMES,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        latents=noise.clone(),
        output_type="pt",
    ).frames
    with torch.no_grad():
        video = family.decode(teacher.vae, stock)
    assert video.shape == (len(PROMPTS), 3, NUM_FRAMES, size, size)
    torch.testing.assert_close(video.transpose(1, 2), stock_video, atol=1e-4, rtol=1e-4)


def test_the_grid_is_the_teacher_schedulers_static_shift_at_every_size(wan_dirs, prompt_file, tmp_path):
    """Wan's shift is static (UniPC's `flow_shift`: 3.0 for Wan 2.1 at 480p, 5.0 for TI2V-5B): the default grid is
    `shifted_flow_grid` at that shift for every resolution and frame count; `--shift` replaces it."""
    from diffusers_dmdr.preflight import check_run_inputs

    for variant, shift in (("2.1", 3.0), ("2.2-ti2v", 5.0)):
        grids = {
            tuple(
                check_run_inputs(
                    wan_config(wan_dirs[variant], prompt_file, tmp_path, variant, resolution=size, num_frames=frames)
                ).student_timesteps
            )
            for size in (SIZES[variant], 2 * SIZES[variant])
            for frames in (5, 9)
        }
        assert grids == {tuple(shifted_flow_grid(4, shift))}
    config = wan_config(wan_dirs["2.1"], prompt_file, tmp_path, shift=7.0)
    assert check_run_inputs(config).student_timesteps == shifted_flow_grid(4, 7.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_frames": 10}, r"--num_frames 10: .* temporal factor 4; use 9 or 13\."),
        ({"num_frames": 80}, r"use 77 or 81\."),
        ({"resolution": 40}, r"--resolution 40 is not divisible by 16 .*; use e\.g\. 32 or 48\."),
        ({"reward_vae_model_name_or_path": "madebyollin/taesd"}, r"cannot decode Wan's video latents"),
    ],
)
def test_bad_frame_counts_and_sizes_are_refused_before_any_weight_loads(
    overrides, message, wan_dirs, prompt_file, tmp_path, monkeypatch
):
    from diffusers import WanPipeline

    from diffusers_dmdr.preflight import check_run_inputs

    def no_loading(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr(WanPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=message):
        check_run_inputs(wan_config(wan_dirs["2.1"], prompt_file, tmp_path, **overrides))


@pytest.mark.parametrize(("flag", "value"), [("num_frames", 9), ("reward_frames", [0, -1])])
def test_video_flags_are_refused_for_an_image_teacher(flag, value, tiny_teacher_dirs, prompt_file, tmp_path):
    from diffusers_dmdr.preflight import check_run_inputs

    config = tiny_config(tiny_teacher_dirs["sd3"], prompt_file, tmp_path, **{flag: value})
    with pytest.raises(ValueError, match=f"--{flag} .* applies to video teachers"):
        check_run_inputs(config)


def test_two_expert_wan_22_a14b_is_refused_naming_the_supported_checkpoints(wan_dirs, prompt_file, tmp_path):
    """Wan 2.2 T2V-A14B's model_index names `transformer_2` and a `boundary_ratio`: refused from the index alone."""
    import shutil

    from diffusers_dmdr.preflight import check_run_inputs

    folder = tmp_path / "a14b"
    shutil.copytree(wan_dirs["2.1"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"two-expert Wan 2\.2 A14B .*/Wan2\.1-T2V-1\.3B-Diffusers"):
        check_run_inputs(wan_config(str(folder), prompt_file, tmp_path))


# Values the Wan recipes take from the released SD3.5-Large script (their headers say which, and what is not).
RELEASED_SD35_KEYS = (
    "mixed_precision",
    "use_8bit_adam",
    "training_mode",
    "backward_simulation",
    "flow_x0_noise_level",
    "lora_rank",
    "lora_alpha",
    "fake_lora_rank",
    "fake_lora_alpha",
    "fake_score_lora_scale",
    "real_score_lora_scale",
    "dynamic_steps",
    "update_ratio",
    "guidance_scale_jitter",
    "cold_start_steps",
    "max_train_steps",
    "learning_rate",
    "learning_rate_fake",
)
WAN_RECIPES = {
    "wan21_t2v_1.3b_4step": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", (480, 832), 81),
    "wan22_ti2v_5b_4step": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", (704, 1280), 121),
}


@pytest.mark.parametrize("name", sorted(WAN_RECIPES))
def test_wan_recipes_take_the_released_sd35_values_they_name(name):
    from pathlib import Path

    import yaml

    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.families.wan import check_num_frames

    root = Path(__file__).resolve().parents[1]
    released = yaml.safe_load((root / "tests" / "data" / "released_recipes.yaml").read_text())["sd35_large_4step"]
    recipe = root / "examples" / "train_dmdr" / "configs" / f"{name}.yaml"
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    teacher, size, frames = WAN_RECIPES[name]
    assert (config.family, config.pretrained_model_name_or_path, config.num_student_steps) == ("wan", teacher, 4)
    assert (config.image_size, config.num_frames, config.student_timesteps) == (size, frames, None)
    check_num_frames(config.num_frames, 4)
    assert all(-frames <= index < frames for index in config.reward_frames)
    assert {key: getattr(config, key) for key in RELEASED_SD35_KEYS} == {
        key: released[key] for key in RELEASED_SD35_KEYS
    }
    stage2 = {key: value for key, value in released["stage2"].items() if key != "train_batch_size"}
    assert {key: getattr(config, f"stage2_{key}") for key in stage2} == stage2
    # One clip per GPU (a clip is several images' tokens), and the header says what is extrapolated.
    assert config.train_batch_size == config.stage2_train_batch_size == 1
    header = recipe.read_text(encoding="utf-8")
    assert "EXTRAPOLATED" in header and "GPU:" in header and "memory plan" in header
