"""Tiny, offline FLUX.1 [dev] and FLUX.2 [klein] teachers: real diffusers / transformers classes at toy size.

Used by `python -m diffusers_dmdr.testing build-tiny --family {flux,flux2}` and the tests. The configs keep what
the families' code paths depend on: FLUX.1's guidance embedding and 2x2-packed 16-channel latents, FLUX.2's
patchified latents with (randomised) batch-norm statistics, a Qwen3 encoder deep enough for the stock
`text_encoder_out_layers=(9, 18, 27)`, a tokenizer with the chat template `Flux2KleinPipeline.encode_prompt`
applies, and the teachers' dynamic-shift scheduler configs.
"""

import torch

from .testing_blocks import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer, tiny_vae


# The released FLUX.1 [dev] / FLUX.2 [klein] scheduler configs: exponential time shift by image sequence length.
FLUX_SCHEDULER_CONFIG = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
# The Qwen3 chat template's rendering of one user message with `add_generation_prompt=True` and
# `enable_thinking=False` (an empty thinking block), which is all `Flux2KleinPipeline` asks of it.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# The stock pipeline stacks these hidden states of the Qwen3 encoder (so the tiny one needs 27 layers).
FLUX2_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
TINY_QWEN_HIDDEN_SIZE = 16


# Room for the chat template (about 40 byte tokens) and a short prompt.
TINY_QWEN_MAX_LENGTH = 64


def tiny_qwen_tokenizer(model_max_length: int = TINY_QWEN_MAX_LENGTH):
    """A byte-level BPE `Qwen2Tokenizer` (what `Qwen2TokenizerFast` is in transformers 5) over the 256 byte symbols,
    with Qwen's chat special tokens and a chat template, built in memory."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_encoder(seed: int = 0, vocab_size: int = 320):
    """A 27-layer, 16-wide `Qwen3ForCausalLM` (the FLUX.2 [klein] text encoder class)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_QWEN_HIDDEN_SIZE,
        intermediate_size=32,
        num_hidden_layers=max(FLUX2_TEXT_ENCODER_OUT_LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def tiny_flux_transformer(seed: int = 0, latent_channels: int = 4):
    """FLUX.1 [dev]'s MMDiT at toy size, with its guidance embedding (one double and one single block)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )


def tiny_flux_components(seed: int = 0) -> dict:
    """Components of a tiny `FluxPipeline` (FLUX.1 [dev]): CLIP + T5, a 4-channel VAE with FLUX's scaling and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "transformer": tiny_flux_transformer(seed),
        "vae": tiny_vae(
            seed=seed,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": tiny_clip_text_encoder(with_projection=False, seed=seed),
        "text_encoder_2": tiny_t5_encoder(seed=seed + 1),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux2_transformer(seed: int = 0, latent_channels: int = 4):
    """FLUX.2's MMDiT at toy size, without guidance embedding (the [klein] base models' config)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(FLUX2_TEXT_ENCODER_OUT_LAYERS) * TINY_QWEN_HIDDEN_SIZE,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )


def tiny_flux2_vae(seed: int = 0, latent_channels: int = 4):
    """`AutoencoderKLFlux2` with 4 blocks of 8 channels (factor 8) and non-trivial batch-norm statistics, so that a
    decode that skipped the de-normalisation would show."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=generator))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae.eval()


def tiny_flux2_components(seed: int = 0) -> dict:
    """Components of a tiny `Flux2KleinPipeline` (FLUX.2 [klein] base, `is_distilled=False`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "transformer": tiny_flux2_transformer(seed),
        "vae": tiny_flux2_vae(seed),
        "text_encoder": tiny_qwen3_encoder(seed),
        "tokenizer": tiny_qwen_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "is_distilled": False,
    }
