"""Wan students end to end on the tiny teachers: training on 5-D latents (exact resume, accumulation equal to a larger
batch), video rewards (per frame on a subset, whole-clip), the export (samples.gif, card, the diffusers and
ComfyUI-format LoRA) and every loading route giving back the trainer's own samples for the same generator."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_families_wan import NUM_FRAMES, PROMPTS, SIZES, wan_config

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.export import export_from_trainer
from diffusers_dmdr.families import get_family
from diffusers_dmdr.lora_formats import KOHYA_LORA_WEIGHT_NAME, wan_native_module
from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline
from diffusers_dmdr.rewards import LoadedReward
from diffusers_dmdr.rewards.video import PerFrameReward, select_frames, video_rewards
from diffusers_dmdr.trainer import DMDRTrainer


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FrameBrightness(torch.nn.Module):
    """An image reward: mean brightness of each image; records the batch it was called with."""

    def forward(self, images, prompts):
        self.last_shape, self.last_prompts = tuple(images.shape), list(prompts)
        return images.mean(dim=(1, 2, 3))


class ClipMotion(torch.nn.Module):
    """A whole-clip reward: mean absolute change between consecutive frames."""

    input_kind = "video"

    def forward(self, clips, prompts):
        return (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))


def make_trainer(teacher_dir, prompt_file, output_dir, variant="2.1", rewards=None, **overrides):
    config = wan_config(teacher_dir, prompt_file, output_dir, variant, **overrides)
    teacher = get_family("wan").load_teacher(teacher_dir)
    return DMDRTrainer(config, teacher, PROMPTS, rewards=rewards)


def perturb_student(trainer: DMDRTrainer) -> None:
    """LoRA B starts at zero: give the student a visible change from the teacher."""
    with torch.no_grad():
        for name, parameter in trainer.student_model.named_parameters():
            if "lora_B" in name and f".{STUDENT_ADAPTER}." in name:
                parameter.normal_(std=0.5)


# ------------------------------------------------------------------------------------------------------------------
# Video rewards
# ------------------------------------------------------------------------------------------------------------------
def test_per_frame_reward_scores_the_chosen_frames_and_averages_them():
    clips = torch.rand(2, 3, 5, 8, 8)
    image_reward = FrameBrightness()
    reward = PerFrameReward(image_reward, frame_indices=[0, -1])
    scores = reward(clips, ["a", "b"])
    assert image_reward.last_shape == (4, 3, 8, 8) and image_reward.last_prompts == ["a", "a", "b", "b"]
    expected = (clips[:, :, 0].mean(dim=(1, 2, 3)) + clips[:, :, 4].mean(dim=(1, 2, 3))) / 2
    torch.testing.assert_close(scores, expected)
    assert select_frames(5, None) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="outside the decoded clip's 5 frames"):
        select_frames(5, [5])
    # Clip rewards stay whole; image rewards are wrapped once.
    loaded = [LoadedReward("b", image_reward, 1.0, None), LoadedReward("m", ClipMotion(), 0.5, None)]
    wrapped = video_rewards(loaded, [0])
    assert isinstance(wrapped[0].fn, PerFrameReward) and wrapped[1].fn is loaded[1].fn
    assert video_rewards(wrapped, [0])[0].fn is wrapped[0].fn


def test_load_rewards_probes_a_clip_reward_with_clips():
    from diffusers_dmdr.rewards import load_rewards

    (loaded,) = load_rewards(["test_wan_training.ClipMotion:1.0:hinge=none"], "cpu")
    assert loaded.fn(torch.rand(2, 3, 3, 8, 8), ["a", "b"]).shape == (2,)


def test_the_per_frame_reward_gradient_reaches_the_student(wan_dirs, prompt_file, tmp_path):
    """Stage 2 with only a per-frame reward (DMD off): the reward's gradient flows through the differentiable Wan
    decode into the student's LoRA, and only into the student."""
    image_reward = FrameBrightness()
    trainer = make_trainer(
        wan_dirs["2.1"],
        prompt_file,
        tmp_path,
        rewards=[LoadedReward("brightness", image_reward, 1.0, None)],
        dmd_loss_weight=0.0,
        anchor_loss_weight=1.0,
        cold_start_steps=0,
        reward_frames=[0, 2, -1],
    )
    perturb_student(trainer)
    batch = trainer.rollout(0)[0]
    trainer.optimizer.zero_grad()
    loss, logs = trainer.objective.generator_loss(batch, global_step=0)
    loss.backward()
    # Two clips of three chosen frames each, scored in one call.
    assert image_reward.last_shape[0] == 2 * 3 and "loss_rl" in logs and "reward/brightness" in logs
    student = {n: p.grad for n, p in trainer.student_model.named_parameters() if f".{STUDENT_ADAPTER}." in n}
    fake = {n: p.grad for n, p in trainer.student_model.named_parameters() if f".{FAKE_ADAPTER}." in n}
    assert student and any(grad is not None and grad.abs().sum() > 0 for grad in student.values())
    assert all(grad is None or grad.abs().sum() == 0 for grad in fake.values())


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------
COMPARABLE_ADAM = dict(adam_epsilon=1.0, learning_rate=0.5, learning_rate_fake=0.5)


def test_accumulating_two_micro_batches_equals_one_batch_of_two(wan_dirs, prompt_file, tmp_path):
    common = dict(max_train_steps=1, cold_start_steps=1, update_ratio=2, **COMPARABLE_ADAM)
    one_batch = make_trainer(wan_dirs["2.1"], prompt_file, tmp_path / "a", train_batch_size=2, **common)
    accumulated = make_trainer(
        wan_dirs["2.1"], prompt_file, tmp_path / "b", train_batch_size=1, gradient_accumulation_steps=2, **common
    )
    history_a, history_b = one_batch.train(), accumulated.train()
    for key in ("loss_dmd", "loss_fake"):
        assert history_b[0][key] == pytest.approx(history_a[0][key], rel=1e-4), key
    for adapter in (STUDENT_ADAPTER, FAKE_ADAPTER):
        for (name, a), (_, b) in zip(
            one_batch.student_model.named_parameters(), accumulated.student_model.named_parameters(), strict=True
        ):
            if f".{adapter}." in name:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["2.1", "2.2-ti2v"])
def test_resume_continues_exactly_with_a_cached_prompt_and_a_video_reward(variant, wan_dirs, prompt_file, tmp_path):
    """A run resumed from its checkpoint continues bit for bit, through
    the prompt cache (holding the empty negative prompt), a per-frame reward in stage 2 and TTUR."""

    def trainer_for(output_dir, **overrides):
        rewards = [LoadedReward("brightness", FrameBrightness(), 1.0, None)]
        return make_trainer(
            wan_dirs[variant],
            prompt_file,
            output_dir,
            variant,
            rewards=rewards,
            cache_prompt_embeds=True,
            prompt_embeds_cache_dir=str(tmp_path / "cache"),
            reward_frames=[0, -1],
            **overrides,
        )

    common = dict(max_train_steps=2, cold_start_steps=1, dynamic_steps=2, checkpointing_steps=1)
    history_a = trainer_for(tmp_path / "a", **common).train()
    assert "loss_rl" in history_a[1]
    trainer_for(tmp_path / "b", **{**common, "max_train_steps": 1}).train()
    history_b = trainer_for(tmp_path / "b", **common, resume_from_checkpoint="latest").train()
    assert history_b[0]["step"] == 2
    for key in ("loss_dmd", "loss_fake", "loss_rl", "loss"):
        assert history_b[0][key] == history_a[1][key], key


# ------------------------------------------------------------------------------------------------------------------
# Export and loading routes
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(wan_dirs, prompt_file, tmp_path_factory):
    """`exported(variant, full)`: a tiny Wan trainer with a perturbed student, exported (LoRA only, or with the fused
    full pipeline) with validation clips."""
    runs = {}

    def build(variant: str, full: bool) -> SimpleNamespace:
        key = (variant, full)
        if key not in runs:
            output_dir = tmp_path_factory.mktemp(f"wan-{variant}-{'full' if full else 'lora'}")
            trainer = make_trainer(
                wan_dirs[variant],
                prompt_file,
                output_dir,
                variant,
                validation_prompts=PROMPTS,
                num_validation_images=1,
                export_full_pipeline=full,
                hub_model_id=f"dmdr-tests/wan-{variant}",
            )
            perturb_student(trainer)
            trainer.history = [{"step": 1, "loss_dmd": 0.25}]
            checkpoint = trainer.save_checkpoint()
            runs[key] = SimpleNamespace(
                trainer=trainer,
                checkpoint=checkpoint,
                export_dir=export_from_trainer(trainer),
                teacher_dir=wan_dirs[variant],
                variant=variant,
            )
        return runs[key]

    return build


def student_latents(pipeline, seed: int = 7, size_kwargs: dict | None = None) -> torch.Tensor:
    # No size or frame count for a saved export: its call defaults carry the trained ones.
    return pipeline(list(PROMPTS), generator=seeded(seed), output_type="latent", **(size_kwargs or {})).frames


def lora_route(run) -> FewStepDMDRPipeline:
    from diffusers import WanPipeline

    stock = WanPipeline.from_pretrained(run.teacher_dir)
    stock.load_lora_weights(str(run.export_dir))
    scheduler = DMDRScheduler.from_pretrained(str(run.export_dir), subfolder="scheduler")
    pipeline = FewStepDMDRPipeline.from_pipe(stock, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("variant", ["2.1", "2.2-ti2v"])
def test_every_route_gives_back_the_trainers_samples(variant, exported):
    """Route 1 (the package: the full pipeline folder, or the teacher + the LoRA), route 2 (diffusers with the
    folder's own code) and the stock `WanPipeline` with the student's scheduler all make the trainer's samples for the
    same generator; the teacher under the same sampler does not."""
    from diffusers import DiffusionPipeline, WanPipeline

    run = exported(variant, True)
    expected = run.trainer.sample_latents(PROMPTS, generator=seeded(7))
    assert expected.shape[2] == (NUM_FRAMES - 1) // 4 + 1
    full = FewStepDMDRPipeline.from_pretrained(str(run.export_dir))
    full.set_progress_bar_config(disable=True)
    assert full.config.stock_pipeline == "WanPipeline"
    assert full.stock_pipeline().config.expand_timesteps == (variant != "2.1")
    remote = DiffusionPipeline.from_pretrained(str(run.export_dir), trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    for pipeline in (full, remote):
        torch.testing.assert_close(student_latents(pipeline), expected, rtol=1e-4, atol=1e-4)
    # The teacher's pipeline with the LoRA (no saved call defaults: the card's snippet passes the size and frames).
    size_kwargs = dict(height=SIZES[variant], width=SIZES[variant], num_frames=NUM_FRAMES)
    lora_run = exported(variant, False)
    lora_expected = lora_run.trainer.sample_latents(PROMPTS, generator=seeded(7))
    lora_only = lora_route(lora_run)
    torch.testing.assert_close(student_latents(lora_only, 7, size_kwargs), lora_expected, rtol=1e-4, atol=1e-4)
    # The stock pipeline with the student's scheduler, guidance off, the trained size and frames.
    stock = full.stock_pipeline()
    assert type(stock) is WanPipeline and type(stock.scheduler) is DMDRScheduler
    size = SIZES[variant]
    stock_latents = stock(
        list(PROMPTS),
        height=size,
        width=size,
        num_frames=NUM_FRAMES,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=seeded(7),
        output_type="latent",
    ).frames
    torch.testing.assert_close(stock_latents, expected, rtol=1e-4, atol=1e-4)
    # Not trivially: the teacher under the same sampler samples something else.
    teacher = FewStepDMDRPipeline.from_pipe(WanPipeline.from_pretrained(run.teacher_dir), scheduler=full.scheduler)
    teacher.set_progress_bar_config(disable=True)
    assert not torch.allclose(student_latents(teacher, 7, size_kwargs), expected, atol=1e-2)
    # Decoded, the output is the stock `frames`: (B, F, H, W, 3) arrays by default.
    videos = full(list(PROMPTS), generator=seeded(7)).frames
    assert videos.shape == (2, NUM_FRAMES, size, size, 3)


def test_the_export_has_a_video_sample_and_a_video_card(exported):
    run = exported("2.1", False)
    gif = Image.open(run.export_dir / "samples.gif")
    assert gif.n_frames == NUM_FRAMES and gif.size == (SIZES["2.1"], 2 * SIZES["2.1"])
    assert not (run.export_dir / "samples.png").exists()
    card = (run.export_dir / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and "text-to-video student" in card
    assert "![samples](samples.gif)" in card and ".frames[0]" in card and ".images[0]" not in card
    assert "passes its scheduler no explicit grid" in card and "diffusion_model.blocks.N.self_attn.q" in card
    assert "height=32, width=32, num_frames=5).frames[0]" in card
    model_index = json.loads((exported("2.1", True).export_dir / "model_index.json").read_text())
    assert model_index["call_defaults"] == {"height": 32, "width": 32, "num_frames": NUM_FRAMES}


def test_comfyui_lora_uses_the_original_wan_keys_and_loads_like_the_diffusers_file(exported, tmp_path):
    """`diffusion_model.blocks.N.self_attn.q` ... (ComfyUI's generic `diffusion_model.<native path>` key map with
    lora_up / lora_down / alpha), every module of the diffusers file, and diffusers' own Wan converter reads it back
    to the same student."""
    from diffusers import WanPipeline

    run = exported("2.1", False)
    comfy = load_file(run.export_dir / KOHYA_LORA_WEIGHT_NAME)
    diffusers_file = load_file(run.export_dir / "pytorch_lora_weights.safetensors")
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in diffusers_file}
    assert {key.rsplit(".", 2)[0] for key in comfy if key.endswith(".lora_down.weight")} == {
        f"diffusion_model.{wan_native_module(module)}" for module in modules
    }
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in comfy
    assert (
        "diffusion_model.blocks.1.cross_attn.o.alpha" in comfy
        and "diffusion_model.blocks.0.ffn.2.lora_up.weight" in comfy
    )
    assert len(comfy) == 3 * len(modules)
    with pytest.raises(ValueError, match="no original Wan key"):
        wan_native_module("blocks.0.norm2")
    # diffusers reads the ComfyUI file through its non-diffusers Wan converter: the same student.
    loaded = {}
    for name, weight_name in (("diffusers", "pytorch_lora_weights.safetensors"), ("comfy", KOHYA_LORA_WEIGHT_NAME)):
        stock = WanPipeline.from_pretrained(run.teacher_dir)
        stock.load_lora_weights(str(run.export_dir), weight_name=weight_name)
        stock.set_progress_bar_config(disable=True)
        loaded[name] = stock(
            list(PROMPTS), height=32, width=32, num_frames=NUM_FRAMES, num_inference_steps=2, guidance_scale=1.0,
            generator=seeded(3), output_type="latent",
        ).frames  # fmt: skip
    torch.testing.assert_close(loaded["comfy"], loaded["diffusers"], rtol=1e-4, atol=1e-5)
    assert Path(run.export_dir / "pytorch_lora_weights.safetensors").is_file()


def test_non_square_clips_train_and_export_at_the_trained_size(wan_dirs, prompt_file, tmp_path):
    """Wan samples 480 x 832: `--resolution 32 --width 64` trains on (C, F, 4, 8) latents, and the exported pipeline's
    call defaults give back the trainer's samples at that size."""
    trainer = make_trainer(wan_dirs["2.1"], prompt_file, tmp_path, width=64)
    assert trainer.latent_shape == (16, 2, 4, 8)
    perturb_student(trainer)
    expected = trainer.sample_latents(PROMPTS, generator=seeded(5))
    pipeline = FewStepDMDRPipeline(
        vae=trainer.vae,
        text_encoder=trainer.pipeline.text_encoder,
        tokenizer=trainer.pipeline.tokenizer,
        scheduler=trainer.scheduler,
        transformer=trainer.student_model,
        call_defaults=get_family("wan").export_call_defaults(trainer.config, trainer.pipeline),
    )
    pipeline.set_progress_bar_config(disable=True)
    torch.testing.assert_close(student_latents(pipeline, 5), expected, rtol=1e-4, atol=1e-4)


def test_dmdr_export_of_a_checkpoint_rebuilds_the_trainer_export(exported, tmp_path):
    """The export entry point (`export_checkpoint`) on a Wan checkpoint: the same files, the same LoRAs in both
    formats, and a GIF sampled by the exported pipeline equal to the trainer's up to 8-bit rounding."""
    import numpy as np

    from diffusers_dmdr.export import export_checkpoint

    run = exported("2.1", False)
    folder = export_checkpoint(run.checkpoint, tmp_path / "standalone", base_model="dmdr-tests/wan-teacher")
    produced = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    reference = {str(p.relative_to(run.export_dir)) for p in run.export_dir.rglob("*") if p.is_file()}
    assert produced == {p for p in reference if not p.startswith("checkpoint-")}
    assert {"samples.gif", KOHYA_LORA_WEIGHT_NAME, "pytorch_lora_weights.safetensors"} <= produced
    for name in (KOHYA_LORA_WEIGHT_NAME, "pytorch_lora_weights.safetensors"):
        expected, actual = load_file(run.export_dir / name), load_file(folder / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6)
    for frame in range(NUM_FRAMES):
        frames = []
        for path in (folder / "samples.gif", run.export_dir / "samples.gif"):
            gif = Image.open(path)
            gif.seek(frame)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
        # GIF palettes quantise colours: compare the mean difference, not the worst pixel.
        assert np.abs(frames[0] - frames[1]).mean() <= 2.0


WAN_SNIPPET_RUNNER = """
import json, re, sys
from pathlib import Path

readme, repo_id, folder, teacher = sys.argv[1:5]
results = []
for route, code in enumerate(re.findall(r"```python\\n(.*?)```", Path(readme).read_text(), flags=re.S), start=1):
    namespace = {}
    exec(code.replace(f'"{repo_id}"', repr(folder)).replace('"<teacher-hub-id>"', repr(teacher)), namespace)
    pipe = namespace["pipe"]
    results.append({"route": route, "pipeline": type(pipe).__name__, "module": type(pipe).__module__,
                    "video_shape": list(namespace["video"].shape)})
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.slow
def test_the_wan_card_snippets_run_in_a_fresh_process(exported, tmp_path):
    """Routes 1 (the package) and 2 (diffusers with the folder's code) of a LoRA-only Wan card load the teacher, the
    LoRA and the scheduler, and return a clip of the trained size and length (route 3 names no stock scheduler).
    Slow (a ~20 s fresh Python); the same loads run in-process in `test_every_route_gives_back_the_trainers_samples`."""
    from test_export import run_python, subprocess_env

    run = exported("2.1", False)
    args = [str(run.export_dir / "README.md"), "dmdr-tests/wan-2.1", str(run.export_dir), str(run.teacher_dir)]
    results = json.loads(run_python(WAN_SNIPPET_RUNNER, args, subprocess_env(tmp_path)).stdout.split("RESULTS", 1)[1])
    assert [entry["route"] for entry in results] == [1, 2]
    assert {entry["pipeline"] for entry in results} == {"FewStepDMDRPipeline"}
    assert results[0]["module"] == "diffusers_dmdr.pipelines.pipeline_dmdr"
    assert results[1]["module"].startswith("diffusers_modules")
    assert all(entry["video_shape"] == [NUM_FRAMES, SIZES["2.1"], SIZES["2.1"], 3] for entry in results)


def test_validation_writes_an_animated_grid(wan_dirs, prompt_file, tmp_path):
    trainer = make_trainer(wan_dirs["2.1"], prompt_file, tmp_path, validation_prompts=PROMPTS, num_validation_images=1)
    path = trainer.log_validation()
    assert path.suffix == ".gif" and Image.open(path).n_frames == NUM_FRAMES
