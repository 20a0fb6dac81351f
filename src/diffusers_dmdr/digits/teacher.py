"""The digits teacher: a genuine `StableDiffusionXLPipeline`, tiny, trained here on the scikit-learn digits.

Every component is the stock diffusers / transformers class that a real SDXL checkpoint uses, at toy size:

- `AutoencoderKL` with four blocks (SD's spatial factor 8): a 32 x 64 pair image becomes a 4 x 4 x 8 latent. It is
  trained on the pair images (L2 reconstruction + a small KL term) and its `scaling_factor` set to one over the
  latents' standard deviation, as for SD's autoencoders;
- `UNet2DConditionModel` with `addition_embed_type="text_time"` (SDXL's pooled-text + size conditioning), trained
  with the epsilon objective on the standard SDXL `scaled_linear` betas, with prompt dropout so that classifier-free
  guidance works;
- two CLIP text encoders (`CLIPTextModel` and `CLIPTextModelWithProjection`) with word-level `CLIPTokenizer`s built
  from an in-memory vocabulary (no files). They start random and are trained with the U-Net
  (`train_text_encoders`), standing in for the pretrained encoders of a real checkpoint;
- `EulerDiscreteScheduler` with SDXL's configuration.

The folder written by `save_pretrained` loads with `DiffusionPipeline.from_pretrained(folder)` and generates with
`pipe(prompt, num_inference_steps=50, guidance_scale=3.0, height=32, width=64)` like any SDXL checkpoint.

Prompt dropout replaces the prompt by the empty prompt for a fraction of the training samples; half of those use the
*encoded* empty prompt and half all-zero embeddings, so that the teacher's unconditional branch is right both for the
stock pipeline (`force_zeros_for_empty_prompt=True` zeroes the negative embeddings) and for code that encodes `""`.
"""

import copy
import string

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DIGIT_WORDS, DIGITS_RESOLUTION, PROMPT_TEMPLATES, all_prompts
from .pairs import PAIR_TEMPLATES


# Token length of the digits tokenizers: the longest prompt is 7 words + BOS/EOS.
DIGITS_MAX_LENGTH = 16
# SDXL's noise schedule (the `scaled_linear` betas of every SDXL checkpoint).
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# Text encoders: width of the hidden states (both encoders) and of the pooled projection (second encoder).
TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_DIM = 32
# SDXL's micro-conditioning: 6 time ids (original size, crop top-left, target size), each embedded in 8 dims.
ADDITION_TIME_EMBED_DIM = 8


def _vocabulary_words() -> list[str]:
    words = set(DIGIT_WORDS) | set(string.digits)
    for template in PROMPT_TEMPLATES + PAIR_TEMPLATES:
        words |= {word for word in template.split() if not word.startswith("{")}
    # A few more everyday words, so that hand-written prompts still tokenize into whole words.
    words |= {"an", "image", "of", "written", "picture", "photo", "digits", "figure"}
    # Longest first: every merge of a word then ranks before the first merge of any shorter word, so a short word's
    # first pair ("a n" of "and") cannot split a longer one ("handwritten").
    return sorted(words, key=lambda word: (-len(word), word))


def digits_tokenizer(model_max_length: int = DIGITS_MAX_LENGTH):
    """A word-level `CLIPTokenizer` for the digit prompts, built from an in-memory BPE vocabulary (no files).

    Every word of the prompts is one token (its BPE merges are spelled out letter by letter); any other word falls
    back to characters.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in _vocabulary_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def digits_text_encoder(with_projection: bool, vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer CLIP text encoder, frozen until `train_unet(train_text_encoders=True)` trains
    it; `with_projection` gives SDXL's second encoder.

    The token embeddings are re-drawn with unit variance (CLIP's default is 0.02) so that the penultimate hidden
    states that SDXL feeds to cross-attention are of order one from the start.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        projection_dim=TEXT_PROJECTION_DIM,
        max_position_embeddings=DIGITS_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model.eval().requires_grad_(False)


def digits_vae(
    seed: int = 0,
    sample_size: int | tuple[int, int] = DIGITS_RESOLUTION,
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32),
):
    """`AutoencoderKL` with 4 latent channels and one down-sampling per block after the first: the default four
    blocks give SD's spatial factor 8 (a 32 x 64 pair becomes a 4 x 4 x 8 latent)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        force_upcast=False,
    )


def digits_unet(
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    sample_size: int | tuple[int, int] = DIGITS_RESOLUTION // 4,
):
    """The SDXL-architecture U-Net of the teacher: `text_time` conditioning, cross-attention on both encoders.

    Like SDXL, the first level has no attention and every deeper level has cross-attention (the deepest one with two
    transformer layers). `block_out_channels` sets the widths and, by its length (2 or more), the number of levels.
    With three levels a 4 x 8 x 16 pair latent reaches 2 x 4 at the deepest level, where every position is next to a
    border: the convolutions' zero padding tells left from right there, which a two-level U-Net (4 x 8) barely can
    (docs/digits.md, "How the teacher was made").
    """
    from diffusers import UNet2DConditionModel

    num_levels = len(block_out_channels)
    if num_levels < 2:
        raise ValueError(f"The digits U-Net needs at least 2 levels, got block_out_channels={block_out_channels}.")
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (num_levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (num_levels - 1) + ("UpBlock2D",),
        attention_head_dim=(2,) + (4,) * (num_levels - 1),
        use_linear_projection=True,
        transformer_layers_per_block=(1,) * (num_levels - 1) + (2,),
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
        norm_num_groups=8,
    )


def digits_scheduler():
    """`EulerDiscreteScheduler` with SDXL's configuration (epsilon prediction, `scaled_linear` betas)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def train_vae(
    vae,
    images: torch.Tensor,
    num_steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
):
    """Train `vae` to reconstruct `images` and set its `scaling_factor` to one over the latents' std.

    Args:
        vae (`AutoencoderKL`): the autoencoder to train in place.
        images (`torch.Tensor`): training images of shape `(N, 3, H, W)` in [0, 1].
        num_steps (`int`, *optional*, defaults to 300): AdamW steps.
        batch_size (`int`, *optional*, defaults to 32): images per step.
        learning_rate (`float`, *optional*, defaults to 2e-3): peak learning rate (one-cycle schedule).
        kl_weight (`float`, *optional*, defaults to 1e-6): weight of the posterior's KL to N(0, I), SD's value.
        seed (`int`, *optional*, defaults to 0): seeds batches and posterior samples.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.

    Returns:
        `AutoencoderKL`: the trained autoencoder, frozen, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=num_steps)
    pixels = images * 2.0 - 1.0
    vae.train()
    bar = tqdm(range(num_steps), desc="train teacher VAE", disable=not progress, leave=False)
    for _ in bar:
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, images, scaling_factor=1.0, generator=generator)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, scaling_factor: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latent samples of shape `(N, 4, H/4, W/4)` for `images` of shape `(N, 3, H, W)` in [0, 1]."""
    scaling_factor = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    latents = []
    for chunk in images.split(256):
        posterior = vae.encode(chunk * 2.0 - 1.0).latent_dist
        latents.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
    return torch.cat(latents) * scaling_factor


def tokenize_prompts(tokenizers, prompts: list[str]) -> list[torch.Tensor]:
    """Padded `input_ids` of `prompts` for each tokenizer, as `StableDiffusionXLPipeline.encode_prompt` makes them."""
    return [
        tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in tokenizers
    ]


def embed_input_ids(text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings of tokenized prompts: the penultimate hidden states of both encoders, concatenated,
    and the second encoder's pooled projection."""
    hidden_states = []
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        output = encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output[0]


def _update_ema(ema_module: torch.nn.Module, module: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_param, param in zip(ema_module.parameters(), module.parameters(), strict=True):
            ema_param.lerp_(param, 1.0 - decay)


def train_unet(
    unet,
    latents: torch.Tensor,
    labels: torch.Tensor,
    text_components: dict,
    num_steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    prompt_dropout: float = 0.1,
    ema_decay: float = 0.995,
    snr_gamma: float | None = 5.0,
    resolution: int | tuple[int, int] = DIGITS_RESOLUTION,
    seed: int = 0,
    progress: bool = True,
    prompts: list[str] | None = None,
    num_templates: int = len(PROMPT_TEMPLATES),
    warmup_steps: int | None = None,
    train_text_encoders: bool = False,
    step_callback=None,
):
    """Train the SDXL U-Net with the epsilon objective on the digits' latents, with prompt dropout; return its EMA.

    Each sample's prompt is one of the phrasings of its label, drawn at random (`prompts[label * num_templates + t]`,
    `t` uniform); with probability `prompt_dropout` it is replaced by the unconditional input (the encoded empty
    prompt or zeros, half each; see the module docstring). Timesteps are uniform on SDXL's 1000 training steps.

    Args:
        unet (`UNet2DConditionModel`): the U-Net to train (a copy is returned as the EMA).
        latents (`torch.Tensor`): scaled latents of shape `(N, 4, h, w)`.
        labels (`torch.Tensor`): int64 labels of shape `(N,)`, indices into the prompt table's labels.
        text_components (`dict`): `text_encoder`, `text_encoder_2`, `tokenizer`, `tokenizer_2`.
        num_steps (`int`, *optional*, defaults to 1500): AdamW steps.
        batch_size (`int`, *optional*, defaults to 64): samples per step.
        learning_rate (`float`, *optional*, defaults to 1e-3): peak learning rate (one-cycle schedule).
        prompt_dropout (`float`, *optional*, defaults to 0.1): probability of the unconditional input.
        ema_decay (`float`, *optional*, defaults to 0.995): decay of the weight EMA that is returned (with the
            usual `(1 + k) / (10 + k)` warm-up).
        snr_gamma (`float`, *optional*, defaults to 5.0): Min-SNR-gamma loss weighting
            (https://huggingface.co/papers/2303.09556); `None` for the plain mean squared error.
        resolution (`int` or `tuple[int, int]`, *optional*, defaults to 32): image side, or `(height, width)`, for
            SDXL's size time ids.
        seed (`int`, *optional*, defaults to 0): seeds batches, prompts, noise and timesteps.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        prompts (`list[str]`, *optional*): the prompt table, label-major with `num_templates` phrasings per label;
            defaults to the single-digit `all_prompts()`.
        num_templates (`int`, *optional*): phrasings per label in `prompts`.
        warmup_steps (`int`, *optional*): if set, a linear warm-up over this many steps and then a constant
            learning rate instead of the one-cycle schedule. The run is then the same whatever `num_steps` is, so
            the EMA after `k` steps of a long run *is* the `k`-step teacher (used to choose the budget).
        train_text_encoders (`bool`, *optional*, defaults to `False`): train both text encoders with the U-Net (the
            denoising loss reaches them). A real SDXL's encoders come pretrained on text; the digits' encoders start
            random, and frozen random features leave word order nearly unusable (docs/digits.md). At the end the
            encoders of `text_components` hold their EMA weights, frozen, in eval mode.
        step_callback (`callable`, *optional*): called as `step_callback(step, ema_unet, ema_text_components)` after
            every step (`step` counts from 1; `ema_text_components` is `text_components` with the encoders' EMA);
            the budget curve evaluates the EMA there.

    Returns:
        `UNet2DConditionModel`: the EMA U-Net, frozen, in eval mode.
    """
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SDXL_SCHEDULER_CONFIG.items() if k != "timestep_spacing"})
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)

    # 1. Every prompt of every label, tokenized once, plus the empty prompt at the end. Frozen encoders embed them
    #    once; trained encoders embed each batch's prompts anew.
    prompts = list(all_prompts() if prompts is None else prompts) + [""]
    text_encoders = [text_components["text_encoder"], text_components["text_encoder_2"]]
    input_ids = tokenize_prompts([text_components["tokenizer"], text_components["tokenizer_2"]], prompts)
    if train_text_encoders:
        for encoder in text_encoders:
            encoder.train().requires_grad_(True)
        ema_text_encoders = [copy.deepcopy(encoder).eval().requires_grad_(False) for encoder in text_encoders]
    else:
        with torch.no_grad():
            prompt_embeds_table, pooled_embeds_table = embed_input_ids(text_encoders, input_ids)
        ema_text_encoders = text_encoders
    ema_text_components = {
        **text_components,
        "text_encoder": ema_text_encoders[0],
        "text_encoder_2": ema_text_encoders[1],
    }
    empty_index = len(prompts) - 1
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    # SDXL's micro-conditioning as the stock pipeline builds it: original size, crop (0, 0), target size.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    parameters = list(unet.parameters())
    if train_text_encoders:
        parameters += [param for encoder in text_encoders for param in encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    if warmup_steps is None:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=num_steps)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    unet.train()
    bar = tqdm(range(num_steps), desc="train teacher U-Net", disable=not progress, leave=False)
    for step in bar:
        # 2. A batch: latents, a phrasing of each label (or the unconditional input), noise and timesteps.
        batch_index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        latents_0 = latents[batch_index]
        prompt_index = labels[batch_index] * num_templates + torch.randint(
            0, num_templates, (batch_size,), generator=generator
        )
        dropped = torch.rand(batch_size, generator=generator) < prompt_dropout
        # Half of the dropped samples see the encoded empty prompt, half all-zero embeddings.
        zeroed = dropped & (torch.randint(0, 2, (batch_size,), generator=generator) == 1)
        prompt_index = torch.where(dropped, empty_index, prompt_index)
        if train_text_encoders:
            prompt_embeds, pooled_prompt_embeds = embed_input_ids(
                text_encoders, [ids[prompt_index] for ids in input_ids]
            )
        else:
            prompt_embeds, pooled_prompt_embeds = prompt_embeds_table[prompt_index], pooled_embeds_table[prompt_index]
        prompt_embeds = prompt_embeds.masked_fill(zeroed[:, None, None], 0.0)
        pooled_prompt_embeds = pooled_prompt_embeds.masked_fill(zeroed[:, None], 0.0)
        noise = torch.randn(latents_0.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy_latents = noise_scheduler.add_noise(latents_0, noise, timesteps)

        # 3. Predict the noise and step.
        noise_pred = unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": time_ids.expand(batch_size, -1)},
        ).sample
        per_sample_loss = (noise_pred - noise).pow(2).mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            per_sample_loss = per_sample_loss * snr[timesteps].clamp(max=snr_gamma) / snr[timesteps]
        loss = per_sample_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()

        # 4. EMA of the weights, with warm-up.
        decay = min(ema_decay, (1 + step) / (10 + step))
        _update_ema(ema_unet, unet, decay)
        if train_text_encoders:
            for ema_encoder, encoder in zip(ema_text_encoders, text_encoders, strict=True):
                _update_ema(ema_encoder, encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step_callback is not None:
            step_callback(step + 1, ema_unet, ema_text_components)
    if train_text_encoders:
        for ema_encoder, encoder in zip(ema_text_encoders, text_encoders, strict=True):
            encoder.load_state_dict(ema_encoder.state_dict())
            encoder.eval().requires_grad_(False)
    return ema_unet.eval()


def digits_text_components(seed: int = 0) -> dict:
    """The two tokenizers and frozen text encoders of the teacher."""
    tokenizer = digits_tokenizer()
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": digits_tokenizer(),
        "text_encoder": digits_text_encoder(with_projection=False, vocab_size=len(tokenizer), seed=seed),
        "text_encoder_2": digits_text_encoder(with_projection=True, vocab_size=len(tokenizer), seed=seed + 1),
    }


def assemble_teacher(vae, unet, text_components: dict):
    """The `StableDiffusionXLPipeline` of trained components (fp32, CPU)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        scheduler=digits_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        **text_components,
    )
