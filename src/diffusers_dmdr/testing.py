"""Tiny, offline, real diffusers components for tests, benchmarks and users' smoke tests.

Every builder returns genuine diffusers / transformers classes at toy size, with tokenizers built in code, so no
file is downloaded from any hub. Sizes follow diffusers' own pipeline tests.

Command line:

```
python -m diffusers_dmdr.testing build-tiny --family sdxl --output /tmp/tiny-sdxl
```

writes a pipeline folder that `DiffusionPipeline.from_pretrained(folder)` loads like any SDXL, SD3, FLUX.1 [dev],
FLUX.2 [klein], Z-Image, Qwen-Image or Wan checkpoint (FLUX builders in `testing_flux.py`, Wan in `testing_wan.py`
(`--wan_variant 2.2-ti2v` for Wan 2.2 TI2V-5B's layout), the shared encoders and autoencoder in `testing_blocks.py`).

```
python -m diffusers_dmdr.testing build-tiny --reward clip --output /tmp/tiny-clip
```

writes a tiny reward model for smoke tests: a transformers `CLIPModel` with its tokenizer and image processor
(safetensors), which `--reward clip:model=/tmp/tiny-clip` (or `pickscore:model=/tmp/tiny-clip`) loads offline.
"""

import argparse
from pathlib import Path

import torch

from .families import FAMILIES, get_family
from .testing_blocks import (
    tiny_clip_text_config,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_vae,
)
from .testing_flux import tiny_flux2_components, tiny_flux_components


# Every family of the registry has a tiny teacher (`tiny_pipeline`).
TINY_FAMILIES = tuple(FAMILIES)


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


# Special tokens of the Qwen chat format (Qwen2.5-VL and Qwen3 share them).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat template reduced to what `ZImagePipeline._encode_prompt` renders: user turns, the generation prompt, and
# the empty think block that `enable_thinking=False` adds (the pipeline passes `enable_thinking=True`: no block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def tiny_qwen_tokenizer(model_max_length: int = 1024, chat_template: str | None = None):
    """A byte-level BPE `Qwen2Tokenizer` (the class Qwen2.5-VL and Qwen3 use) built in code: one token per byte, no
    merges, and the Qwen chat special tokens; `chat_template` is set on it when given."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: index for index, token in enumerate(QWEN_SPECIAL_TOKENS)}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# 3 special tokens + 256 byte symbols, rounded up.
TINY_QWEN_VOCAB_SIZE = 272


def tiny_qwen3_text_encoder(seed: int = 0, hidden_size: int = 16):
    """A 2-layer `Qwen3Model` (Z-Image's text encoder class) over the tiny Qwen vocabulary."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        hidden_size=hidden_size,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=TINY_QWEN_VOCAB_SIZE,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def tiny_qwen25vl_text_encoder(seed: int = 0, hidden_size: int = 16):
    """A 2-layer `Qwen2_5_VLForConditionalGeneration` (Qwen-Image's text encoder class), sizes of diffusers' own
    Qwen-Image pipeline test; the vision token ids are the last ids of the tiny vocabulary, which its tokenizer never
    produces."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": TINY_QWEN_VOCAB_SIZE,
            "max_position_embeddings": 2048,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=hidden_size,
        vocab_size=TINY_QWEN_VOCAB_SIZE,
        bos_token_id=0,
        eos_token_id=2,
        vision_start_token_id=TINY_QWEN_VOCAB_SIZE - 3,
        vision_end_token_id=TINY_QWEN_VOCAB_SIZE - 2,
        vision_token_id=TINY_QWEN_VOCAB_SIZE - 1,
        image_token_id=TINY_QWEN_VOCAB_SIZE - 1,
        video_token_id=TINY_QWEN_VOCAB_SIZE - 1,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_zimage_transformer(seed: int = 0):
    """`ZImageTransformer2DModel` at the size of diffusers' own Z-Image pipeline test (16 latent channels, 2x2
    patches), with the pad tokens set to ones as that test does (random pad tokens make outputs seed-fragile)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 32, 32],
    )
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return transformer


def tiny_zimage_components(seed: int = 0, shift: float = 3.0) -> dict:
    """Components of a tiny `ZImagePipeline`: Qwen3 text encoder with its chat template, 16-channel VAE (factor 8),
    and Z-Image's static-shift flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "transformer": tiny_zimage_transformer(seed),
        "vae": tiny_vae(latent_channels=16, seed=seed, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": tiny_qwen3_text_encoder(seed),
        "tokenizer": tiny_qwen_tokenizer(model_max_length=512, chat_template=QWEN3_CHAT_TEMPLATE),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
    }


def tiny_qwenimage_components(seed: int = 0) -> dict:
    """Components of a tiny `QwenImagePipeline`: Qwen2.5-VL text encoder, the causal 3-D `AutoencoderKLQwenImage`
    (4 latent channels, spatial factor 4, per-channel latents mean/std), and Qwen-Image's dynamic-shift scheduler
    (the released `scheduler_config.json` values: exponential time shift, terminal 0.02)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": tiny_qwen25vl_text_encoder(seed),
        "tokenizer": tiny_qwen_tokenizer(),
        "scheduler": scheduler,
    }


def tiny_pipeline(family: str, seed: int = 0, **kwargs):
    """A tiny stock diffusers pipeline of `family` (one of `TINY_FAMILIES`), in fp32, on the CPU."""
    from diffusers import (
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        ZImagePipeline,
    )

    if family == "sdxl":
        return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))
    if family == "sd15":
        return StableDiffusionPipeline(**tiny_sd15_components(seed, **kwargs))
    if family == "sd3":
        return StableDiffusion3Pipeline(**tiny_sd3_components(seed, **kwargs))
    if family in ("flux", "flux2"):
        from diffusers import Flux2KleinPipeline, FluxPipeline

        if family == "flux":
            return FluxPipeline(**tiny_flux_components(seed, **kwargs))
        return Flux2KleinPipeline(**tiny_flux2_components(seed, **kwargs))
    if family == "zimage":
        return ZImagePipeline(**tiny_zimage_components(seed, **kwargs))
    if family == "qwenimage":
        return QwenImagePipeline(**tiny_qwenimage_components(seed, **kwargs))
    if family == "wan":
        from .testing_wan import tiny_wan_pipeline

        return tiny_wan_pipeline(seed, **kwargs)
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


# What `build-tiny --reward` can write, and the reward spec that loads it (`{folder}`: the output folder).
TINY_REWARDS = {"clip": "clip:model={folder}"}


def build_tiny_reward(kind: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny reward model to `output_dir` and return the folder. `kind="clip"`: a transformers `CLIPModel`
    (safetensors), its tokenizer and a `preprocessor_config.json`: `clip:model=<folder>` and
    `pickscore:model=<folder>` load it without the Hub."""
    from transformers import CLIPImageProcessorPil

    if kind not in TINY_REWARDS:
        raise ValueError(f"Unknown tiny reward {kind!r}; choose one of {sorted(TINY_REWARDS)}.")
    output_dir = Path(output_dir)
    model, tokenizer = tiny_clip_model(seed)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    # Resize and crop to the vision tower's resolution, CLIP's mean and std (the processor's defaults).
    size = model.config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        output_dir
    )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """`python -m diffusers_dmdr.testing build-tiny ...`; the project's errors end as one line."""
    from .cli import run_entry_point

    run_entry_point("python -m diffusers_dmdr.testing", _build_tiny, argv)


def _build_tiny(argv: list[str]) -> None:
    from .cli import DEBUG_FLAG, DEBUG_HELP

    parser = argparse.ArgumentParser(prog="python -m diffusers_dmdr.testing", description=__doc__.split("\n")[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tiny", help="write a tiny offline teacher pipeline folder or reward model")
    what = build.add_mutually_exclusive_group(required=True)
    what.add_argument("--family", choices=TINY_FAMILIES, help="write a tiny teacher pipeline of this family")
    what.add_argument(
        "--reward",
        choices=sorted(TINY_REWARDS),
        help="write a tiny reward model instead (clip: a CLIPModel folder for --reward clip:model=<output>)",
    )
    build.add_argument("--output", required=True, help="folder to write the pipeline or reward model to")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None)
    build.add_argument(
        "--wan_variant", choices=("2.1", "2.2-ti2v"), default=None, help="wan only: Wan 2.1 T2V or Wan 2.2 TI2V-5B"
    )
    args = parser.parse_args(argv)
    if Path(args.output).expanduser().is_file():
        parser.error(f"--output {args.output} is a file; give a folder (it is created if missing).")
    if args.reward is not None:
        if args.prediction_type is not None or args.wan_variant is not None:
            parser.error("--prediction_type and --wan_variant apply to teachers (--family), not to --reward.")
        path = build_tiny_reward(args.reward, args.output, seed=args.seed)
        spec = TINY_REWARDS[args.reward].format(folder=path)
        print(f"wrote a tiny {args.reward} reward model to {path}; train with --reward {spec}")  # noqa: T201
        return
    kwargs = {} if args.prediction_type is None else {"prediction_type": args.prediction_type}
    if args.wan_variant is not None:
        if args.family != "wan":
            parser.error(f"--wan_variant applies to --family wan, not {args.family}.")
        kwargs["variant"] = args.wan_variant
    if get_family(args.family).is_flow and args.prediction_type is not None:
        parser.error(f"--prediction_type applies to the DDPM families (sdxl, sd15); {args.family} is flow matching.")
    path = build_tiny_pipeline(args.family, args.output, seed=args.seed, **kwargs)
    print(f"wrote a tiny {args.family} pipeline to {path}")  # noqa: T201


if __name__ == "__main__":
    main()
