"""Tiny, offline Wan teachers: a real `WanPipeline` (WanTransformer3DModel, AutoencoderKLWan, UMT5 encoder) at toy
size, built in code (sizes after diffusers' own Wan pipeline tests).

`variant="2.1"` is Wan 2.1 T2V's layout (16 latent channels, VAE factors 8 x 4, UniPC with `flow_shift` 3.0, as the
released 1.3B scheduler config); `variant="2.2-ti2v"` is Wan 2.2 TI2V-5B's (the residual VAE with 2x2 patchified
pixels, spatial factor 16, `expand_timesteps=True`, `flow_shift` 5.0).
"""

import torch

from .testing_blocks import TINY_T5_SHAPE, tiny_t5_tokenizer


WAN_VARIANTS = ("2.1", "2.2-ti2v")


def tiny_umt5_encoder(seed: int = 0, d_model: int = 32):
    """A 2-layer `UMT5EncoderModel` (Wan's text encoder class) over the tiny T5 vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**TINY_T5_SHAPE, d_model=d_model)
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def tiny_wan_transformer(seed: int = 0, in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae(seed: int = 0, variant: str = "2.1"):
    """`AutoencoderKLWan` at toy width: Wan 2.1's layout (16 channels, factor 8) or Wan 2.2's residual one (pixels
    patchified 2x2 into 12 channels, factor 16), with per-channel latent statistics that are not the identity."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if variant == "2.1":
        return AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval()
    z_dim = 8
    return AutoencoderKLWan(
        base_dim=12,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.1 * (index - 4) for index in range(z_dim)],
        latents_std=[1.0 + 0.25 * index for index in range(z_dim)],
    ).eval()


def tiny_wan_components(seed: int = 0, variant: str = "2.1") -> dict:
    """Components (and init flags) of a tiny `WanPipeline` of `variant` (one of `WAN_VARIANTS`)."""
    from diffusers import UniPCMultistepScheduler

    if variant not in WAN_VARIANTS:
        raise ValueError(f"Unknown tiny Wan variant {variant!r}; choose one of {WAN_VARIANTS}.")
    vae = tiny_wan_vae(seed, variant)
    return {
        "transformer": tiny_wan_transformer(seed, in_channels=vae.config.z_dim),
        "vae": vae,
        "text_encoder": tiny_umt5_encoder(seed),
        "tokenizer": tiny_t5_tokenizer(),
        # The released Wan schedulers: UniPC on flow sigmas with a static shift (3.0 for 2.1 at 480p, 5.0 for 2.2).
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=1000,
            flow_shift=3.0 if variant == "2.1" else 5.0,
        ),
        "expand_timesteps": variant != "2.1",
    }


def tiny_wan_pipeline(seed: int = 0, variant: str = "2.1"):
    from diffusers import WanPipeline

    return WanPipeline(**tiny_wan_components(seed, variant))
