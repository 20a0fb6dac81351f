"""Tiny, offline, real diffusers components for tests, benchmarks and users' smoke tests.

Every builder returns genuine diffusers / transformers classes at toy size, with tokenizers built in code, so no
file is downloaded from any hub. Sizes follow diffusers' own pipeline tests.

Command line:

```
python -m diffusers_dmdr.testing build-tiny --family sdxl --output /tmp/tiny-sdxl
```

writes a pipeline folder that `DiffusionPipeline.from_pretrained(folder)` loads like any SDXL, SD3, FLUX.1 [dev] or
FLUX.2 [klein] checkpoint (`--family flux` / `flux2`; builders in `testing_flux.py`).
"""

import argparse
import string
from pathlib import Path

import torch


TINY_FAMILIES = ("sdxl", "sd15", "sd3", "flux", "flux2")
# Text length of every tiny tokenizer; transformers' default (1e30) would make pipelines pad forever.
TINY_MAX_LENGTH = 16


def tiny_clip_tokenizer(model_max_length: int = TINY_MAX_LENGTH):
    """A character-level `CLIPTokenizer` built from an in-memory vocabulary (no files)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_t5_tokenizer(model_max_length: int = TINY_MAX_LENGTH):
    """A character-level unigram `T5TokenizerFast` built from an in-memory vocabulary (no files)."""
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -2.0) for char in chars] + [("\u2581" + char, -2.5) for char in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_clip_text_config(hidden_size: int = 32, projection_dim: int = 32):
    """The 2-layer `CLIPTextConfig` of every tiny text tower (teachers' encoders and the tiny CLIP reward)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=128,
        projection_dim=projection_dim,
        max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_clip_text_encoder(with_projection: bool, seed: int = 0, hidden_size: int = 32, projection_dim: int = 32):
    """A 2-layer CLIP text encoder; `with_projection` gives `CLIPTextModelWithProjection` (SDXL's second encoder)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = tiny_clip_text_config(hidden_size, projection_dim)
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=128,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **config_overrides):
    """`AutoencoderKL` with 4 blocks of 8 channels: spatial factor 8, like the real SD/SDXL/SD3 autoencoders."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **config_overrides,
    ).eval()


def _tiny_unet(seed: int, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **config,
    )


def tiny_autoencoder_tiny(seed: int = 0):
    """A TAESD-shaped `AutoencoderTiny` at toy width (spatial factor 8), for the reward-decode path."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def tiny_sdxl_unet(seed: int = 0):
    """SDXL's UNet at toy size: text_time micro-conditioning, two-encoder cross attention (1.36 M parameters)."""
    return _tiny_unet(
        seed,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 time ids x 8 + the 32-dim pooled embedding of the second text encoder.
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )


def tiny_sd15_unet(seed: int = 0):
    """SD1.x's UNet at toy size: one CLIP encoder, no micro-conditioning."""
    return _tiny_unet(seed, cross_attention_dim=32)


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        # Two CLIP encoders with 32-dim projections, concatenated.
        pooled_projection_dim=64,
        out_channels=4,
    )


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Components of a tiny `StableDiffusionXLPipeline` (epsilon or v_prediction)."""
    from diffusers import EulerDiscreteScheduler

    return {
        "unet": tiny_sdxl_unet(seed),
        "vae": tiny_vae(seed=seed, scaling_factor=0.13025, force_upcast=False),
        "text_encoder": tiny_clip_text_encoder(with_projection=False, seed=seed),
        "text_encoder_2": tiny_clip_text_encoder(with_projection=True, seed=seed + 1),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd15_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    from diffusers import DDIMScheduler

    return {
        "unet": tiny_sd15_unet(seed),
        "vae": tiny_vae(seed=seed, scaling_factor=0.18215),
        "text_encoder": tiny_clip_text_encoder(with_projection=False, seed=seed),
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sd3_components(seed: int = 0, shift: float = 3.0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "transformer": tiny_sd3_transformer(seed),
        "vae": tiny_vae(
            seed=seed,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": tiny_clip_text_encoder(with_projection=True, seed=seed),
        "text_encoder_2": tiny_clip_text_encoder(with_projection=True, seed=seed + 1),
        "text_encoder_3": tiny_t5_encoder(seed=seed + 2),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "tokenizer_3": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_pipeline(family: str, seed: int = 0, **kwargs):
    """A tiny stock diffusers pipeline of `family` (`sdxl`, `sd15`, `sd3`, `flux` or `flux2`), in fp32, on the CPU."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))
    if family == "sd15":
        return StableDiffusionPipeline(**tiny_sd15_components(seed, **kwargs))
    if family == "sd3":
        return StableDiffusion3Pipeline(**tiny_sd3_components(seed, **kwargs))
    if family in ("flux", "flux2"):
        from diffusers import Flux2KleinPipeline, FluxPipeline

        from .testing_flux import tiny_flux2_components, tiny_flux_components

        if family == "flux":
            return FluxPipeline(**tiny_flux_components(seed, **kwargs))
        return Flux2KleinPipeline(**tiny_flux2_components(seed, **kwargs))
    raise ValueError(f"Unknown tiny family {family!r}; choose one of {TINY_FAMILIES}.")


def build_tiny_pipeline(family: str, output_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny `family` pipeline to `output_dir` (safetensors) and return the folder."""
    output_dir = Path(output_dir)
    tiny_pipeline(family, seed=seed, **kwargs).save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def tiny_clip_model(seed: int = 0):
    """A tiny `transformers.CLIPModel` and its `CLIPProcessor`-compatible tokenizer, for reward tests."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    # The text tower's own projection size is unused by CLIPModel, which projects both towers to `projection_dim`.
    text_config = tiny_clip_text_config()
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    return CLIPModel(config).eval(), tiny_clip_tokenizer()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusers_dmdr.testing", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tiny", help="write a tiny offline teacher pipeline folder")
    build.add_argument("--family", choices=TINY_FAMILIES, required=True)
    build.add_argument("--output", required=True, help="folder to write the pipeline to")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None)
    args = parser.parse_args(argv)
    kwargs = {} if args.prediction_type is None else {"prediction_type": args.prediction_type}
    if args.family not in ("sdxl", "sd15") and kwargs:
        parser.error(f"--prediction_type applies to the DDPM families (sdxl, sd15); {args.family} is flow matching.")
    path = build_tiny_pipeline(args.family, args.output, seed=args.seed, **kwargs)
    print(f"wrote a tiny {args.family} pipeline to {path}")  # noqa: T201


if __name__ == "__main__":
    main()
