"""The text encoders, tokenizers and autoencoder that every tiny teacher of `testing.py` and `testing_flux.py` shares:
real transformers / diffusers classes at toy size, tokenizers built in memory (no file is downloaded)."""

import string

import torch


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


# The tiny T5 encoder's shape and special tokens over the tiny T5 vocabulary (also Wan's UMT5, testing_wan.py).
TINY_T5_SHAPE = dict(
    vocab_size=128,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    pad_token_id=0,
    eos_token_id=1,
)


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**TINY_T5_SHAPE, d_model=d_model, dropout_rate=0.0, decoder_start_token_id=0)
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
