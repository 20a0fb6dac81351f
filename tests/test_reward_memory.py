"""The reward path's memory features (issue 23): the decode outside autocast, the checkpointed reward decode
(`--reward_vae_gradient_checkpointing`) and the per-prompt cache of the reward text features
(`--cache_reward_text_features`)."""

import pytest
import torch
from reward_fixtures import save_tiny_clip, save_tiny_open_clip

from diffusers_dmdr.families import get_family
from diffusers_dmdr.memory_estimate import activation_peak, fake_tensors, materialize
from diffusers_dmdr.reward_decode import enable_reward_decode_checkpointing, reward_decode_tiling
from diffusers_dmdr.rewards import LoadedReward, load_rewards
from diffusers_dmdr.rewards.clip import cache_reward_text_features
from diffusers_dmdr.trainer import DMDRTrainer


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


def make_trainer(teacher_dir, prompt_file, output_dir, rewards=None, **overrides):
    from conftest import tiny_config

    config = tiny_config(teacher_dir, prompt_file, output_dir, **overrides)
    teacher = get_family("sdxl").load_teacher(config.pretrained_model_name_or_path)
    return DMDRTrainer(config, teacher, PROMPTS, rewards=rewards)


def small_vae(**config):
    """An SDXL-shaped `AutoencoderKL` (four up blocks, group norms) at toy width."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    values = dict(
        block_out_channels=[8, 16, 16, 16],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    return AutoencoderKL(**{**values, **config}).eval().requires_grad_(False)


# --- the decode outside autocast ------------------------------------------------------------------------------------


def test_reward_decode_runs_in_the_vae_dtype_outside_autocast(tiny_teacher_dirs, prompt_file, tmp_path):
    """Called inside the objective's autocast, the reward decode equals the decode with autocast off, bit for bit;
    the same decode under bf16 autocast differs (the negative control: the test can tell the two apart)."""
    trainer = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = trainer.family.decode(trainer.reward_vae, latents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = trainer.decode_for_rewards(latents)
        under_autocast = trainer.family.decode(trainer.reward_vae, latents)
    assert trainer.reward_vae.dtype == torch.float32
    assert torch.equal(decoded, plain)
    assert not torch.equal(under_autocast, plain)


# --- the checkpointed reward decode ---------------------------------------------------------------------------------


def test_decoder_checkpointing_acts_in_eval_mode_with_a_grad_input():
    """What `--reward_vae_gradient_checkpointing` relies on in diffusers' source: `Decoder.forward` checkpoints its mid
    and up blocks whenever grad is enabled, training mode or not (the reward VAE stays in eval mode). Counted by the
    calls into `torch.utils.checkpoint.checkpoint`; fails loudly if diffusers changes the condition."""
    vae = small_vae()
    enable_reward_decode_checkpointing(vae)
    assert not vae.training and vae.decoder.gradient_checkpointing
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function)
        return original(function, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting
    try:
        latents = torch.randn(1, 4, 8, 8, requires_grad=True)
        vae.decode(latents).sample.sum().backward()
        checkpointed = len(calls)
        with torch.no_grad():
            vae.decode(latents)
    finally:
        torch.utils.checkpoint.checkpoint = original
    modules = [getattr(function, "__self__", None) for function in calls]
    # The mid block and every up block are checkpointed (the mid block's resnets inside it too).
    assert vae.decoder.mid_block in modules and all(block in modules for block in vae.decoder.up_blocks)
    assert len(calls) == checkpointed  # nothing is checkpointed without grad (validation decodes)


def _reward_gradient(vae, latents):
    latents = latents.clone().requires_grad_(True)
    images = get_family("sdxl").decode(vae, latents)
    reward = (images * torch.linspace(0, 1, images.shape[-1])).mean()
    (gradient,) = torch.autograd.grad(reward, latents)
    return reward.detach(), gradient


def test_checkpointed_reward_decode_gives_the_same_gradients():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain_vae, checkpointed_vae = small_vae(), small_vae()
    enable_reward_decode_checkpointing(checkpointed_vae)
    reward, gradient = _reward_gradient(plain_vae, latents)
    checkpointed_reward, checkpointed_gradient = _reward_gradient(checkpointed_vae, latents)
    assert torch.equal(checkpointed_reward, reward)
    torch.testing.assert_close(checkpointed_gradient, gradient, rtol=1e-6, atol=1e-9)
    assert gradient.abs().sum() > 0


def test_checkpointed_reward_decode_holds_less_memory():
    """Activation peak of decode + backward to the latents on fake tensors (the estimator's counter), at 512 px."""

    def peak(checkpointing):
        vae = small_vae(sample_size=512)
        if checkpointing:
            enable_reward_decode_checkpointing(vae)
        with fake_tensors():
            materialize(vae)
            latents = torch.randn(1, 4, 64, 64).requires_grad_(True)
            return activation_peak(lambda: vae.decode(latents).sample.float().mean().backward())[0]

    plain, checkpointed = peak(False), peak(True)
    assert checkpointed < 0.8 * plain, (checkpointed, plain)


def test_reward_vae_gradient_checkpointing_flag_reaches_the_trainer(tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, reward_vae_gradient_checkpointing=True)
    assert trainer.reward_vae.decoder.gradient_checkpointing


def test_autoencoders_without_checkpointing_are_refused_clearly():
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False])
    with pytest.raises(ValueError, match="AutoencoderKLQwenImage has no gradient checkpointing"):
        enable_reward_decode_checkpointing(vae)


# --- the tiled reward decode ---------------------------------------------------------------------------------------


def test_tiled_reward_decode_takes_the_tiled_path_and_restores_the_vae():
    """`reward_decode_tiling` drives diffusers' tiled decode through AutoencoderKL's tile attributes (the private part
    this test guards): a 128 px image in 64 px tiles overlapping by a quarter is 3 x 3 decoder calls; afterwards the
    VAE decodes whole again (validation and export decodes of a shared VAE)."""
    vae = small_vae()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    calls = []
    vae.decoder.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape[-2:])))
    whole = vae.decode(latents).sample
    with reward_decode_tiling(vae, 64):
        tiled = vae.decode(latents).sample
    again = vae.decode(latents).sample
    assert calls[0] == (128, 128) and len(calls) == 1 + 9 + 1 and calls[-1] == (128, 128)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole) and torch.equal(again, whole)
    assert not vae.use_tiling and vae.tile_sample_min_size == vae.config.sample_size
    with reward_decode_tiling(vae, None):
        assert torch.equal(vae.decode(latents).sample, whole)


def test_tiled_checkpointed_decode_same_gradients_and_less_memory():
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    plain_vae, checkpointed_vae = small_vae(), small_vae()
    enable_reward_decode_checkpointing(checkpointed_vae)
    with reward_decode_tiling(plain_vae, 64):
        reward, gradient = _reward_gradient(plain_vae, latents)
    with reward_decode_tiling(checkpointed_vae, 64):
        checkpointed_reward, checkpointed_gradient = _reward_gradient(checkpointed_vae, latents)
    assert torch.equal(checkpointed_reward, reward)
    torch.testing.assert_close(checkpointed_gradient, gradient, rtol=1e-6, atol=1e-9)

    def peak(tile_size):
        vae = small_vae(sample_size=512)
        enable_reward_decode_checkpointing(vae)
        with fake_tensors():
            materialize(vae)
            latents = torch.randn(1, 4, 64, 64).requires_grad_(True)

            def run():
                with reward_decode_tiling(vae, tile_size):
                    vae.decode(latents).sample.float().mean().backward()

            return activation_peak(run)[0]

    assert peak(256) < 0.8 * peak(None)


def test_tiling_refuses_autoencoders_it_does_not_drive():
    from diffusers_dmdr.testing import tiny_autoencoder_tiny

    with pytest.raises(ValueError, match="AutoencoderTiny is not a tiled autoencoder"):
        with reward_decode_tiling(tiny_autoencoder_tiny(), 64):
            pass


def test_reward_vae_tile_size_in_the_trainer_and_preflight(tiny_teacher_dirs, prompt_file, tmp_path):
    from conftest import tiny_config

    from diffusers_dmdr.preflight import check_reward_vae_memory_options

    trainer = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, reward_vae_tile_size=64)
    calls = []
    trainer.reward_vae.decoder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    latents = torch.randn(1, 4, 16, 16)
    trainer.decode_for_rewards(latents)
    trainer.decode(latents)
    assert len(calls) == 9 + 1  # the reward decode in tiles, the validation decode whole
    with pytest.raises(ValueError, match="positive multiple of 64"):
        check_reward_vae_memory_options(
            tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, reward_vae_tile_size=100)
        )
    qwen = tiny_config(tiny_teacher_dirs["qwenimage"], prompt_file, tmp_path, reward_vae_gradient_checkpointing=True)
    with pytest.raises(ValueError, match="AutoencoderKLQwenImage has no gradient checkpointing"):
        check_reward_vae_memory_options(qwen)
    with pytest.raises(ValueError, match="not a tiled autoencoder"):
        check_reward_vae_memory_options(replace_config(qwen, reward_vae_tile_size=512))


def replace_config(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


# --- cached reward text features ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _clip_rewards(folder, prefix=""):
    spec = {"name": "clip", "model": str(folder)}
    if prefix:
        spec["prompt_prefix"] = prefix
    return load_rewards([spec], "cpu")


@pytest.mark.parametrize("prefix", ["", "Realistic photo "])
def test_cached_text_features_give_the_same_rewards_and_free_the_text_tower(tiny_clip_dir, prefix):
    rewards = _clip_rewards(tiny_clip_dir, prefix)
    images = torch.rand(4, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    batch = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    uncached = rewards[0].fn(images, batch)
    clip = rewards[0].fn.reward
    parameters_before = sum(p.numel() for p in clip.parameters())

    assert cache_reward_text_features(rewards, PROMPTS + PROMPTS[:1]) == ["clip"]
    assert sorted(clip.text_features) == sorted(prefix + prompt for prompt in PROMPTS)
    # The text tower is gone: no text parameters left, and the image tower is all that remains.
    model = clip.towers.model
    assert model.text_model is None and model.text_projection is None
    assert not [name for name, _ in clip.named_parameters() if "text" in name]
    assert sum(p.numel() for p in clip.parameters()) < parameters_before
    cached = rewards[0].fn(images, batch)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-6)
    # Gradients still reach the images through the image tower.
    images.requires_grad_(True)
    (gradient,) = torch.autograd.grad(rewards[0].fn(images, batch).sum(), images)
    assert gradient.abs().sum() > 0
    with pytest.raises(KeyError, match="not among them"):
        rewards[0].fn(images[:1], ["a prompt never cached"])


def test_rewards_without_a_text_tower_are_left_alone(tiny_clip_dir):
    class Brightness(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    from diffusers_dmdr.rewards.core import FrozenReward

    other = LoadedReward("brightness", FrozenReward(Brightness(), "brightness"), 1.0, None)
    clip = _clip_rewards(tiny_clip_dir)
    # The same reward listed twice (a training and a held-out list sharing it) is cached once.
    assert cache_reward_text_features([other, *clip, *clip], PROMPTS) == ["clip"]


def test_cache_reward_text_features_flag_in_the_trainer(tiny_teacher_dirs, prompt_file, tmp_path, tiny_clip_dir):
    rewards = _clip_rewards(tiny_clip_dir)
    make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, rewards=rewards, cache_reward_text_features=True)
    clip = rewards[0].fn.reward
    assert sorted(clip.text_features) == sorted(PROMPTS) and clip.towers.model.text_model is None


def test_open_clip_towers_cache_and_free_the_text_tower(tmp_path):
    """The open_clip path (DFN5B CLIP, HPSv2.1): same scores from the cache, no text parameter or buffer left."""
    pytest.importorskip("open_clip", reason="open_clip comes with pip install 'diffusers-dmdr[rewards]'")
    folder = save_tiny_open_clip(tmp_path / "open-clip-tiny")
    rewards = load_rewards([f"clip:model={folder}"], "cpu")
    images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    uncached = rewards[0].fn(images, PROMPTS[:2])
    assert cache_reward_text_features(rewards, PROMPTS) == ["clip"]
    model = rewards[0].fn.reward.towers.model
    left = [name for name, _ in [*model.named_parameters(), *model.named_buffers()] if not name.startswith("visual.")]
    assert set(left) <= {"logit_scale", "logit_bias"}, left
    torch.testing.assert_close(rewards[0].fn(images, PROMPTS[:2]), uncached, rtol=0, atol=1e-6)
