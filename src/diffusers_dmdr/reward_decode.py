"""Memory options of the reward path's differentiable decode: diffusers' gradient checkpointing of the autoencoder
(`--reward_vae_gradient_checkpointing`) and its tiled decode (`--reward_vae_tile_size`), shared by the trainer and
the memory estimate (which runs the same code on fake tensors)."""

from contextlib import contextmanager

import torch


# Autoencoders whose tiled decode this project drives ([`reward_decode_tiling`]): their tile sizes are attributes.
TILED_REWARD_VAES = ("AutoencoderKL", "AutoencoderKLFlux2")


def enable_reward_decode_checkpointing(vae: torch.nn.Module) -> None:
    """diffusers' own gradient checkpointing of the reward decoder (`AutoencoderKL`'s decoder checkpoints its mid and
    up blocks whenever grad is enabled, in eval mode too; `AutoencoderTiny` its whole layer stack), so the reward
    backward recomputes the decode instead of keeping its activations. One clear error for an autoencoder class that
    does not support it (preflight refuses those before any weight loads)."""
    if not getattr(vae, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"--reward_vae_gradient_checkpointing: {type(vae).__name__} has no gradient checkpointing in diffusers; "
            "drop the flag or decode the rewards with a tiny autoencoder (--reward_vae_model_name_or_path)."
        )
    vae.enable_gradient_checkpointing()


@contextmanager
def reward_decode_tiling(vae: torch.nn.Module, tile_size: int | None):
    """diffusers' tiled decode with `tile_size`-pixel tiles for the duration of one reward decode (then the VAE's own
    settings again, so validation and export decodes of a shared VAE are untouched). `None`: nothing changes.

    `enable_tiling()` takes no size and the default tile is the VAE's `sample_size` (1024 px for SDXL's VAE, which
    never tiles a 1024 px image), so the tile attributes `AutoencoderKL` / `AutoencoderKLFlux2` read in `decode` are
    set here directly: the one place that relies on them (`tests/test_reward_memory.py` fails if they change).
    """
    if tile_size is None:
        yield
        return
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size")
    if type(vae).__name__ not in TILED_REWARD_VAES or not all(hasattr(vae, name) for name in names):
        raise ValueError(
            f"--reward_vae_tile_size: {type(vae).__name__} is not a tiled autoencoder this project drives "
            f"({', '.join(TILED_REWARD_VAES)})."
        )
    saved = [getattr(vae, name) for name in names]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile_size, tile_size // factor
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(vae, name, value)
