"""FLUX families: FLUX.1 [dev] (`FluxPipeline`) and FLUX.2 [klein] base (`Flux2KleinPipeline`).

What differs from SD3, and where it is handled:

- **Latents.** The trainer keeps a `(B, C, H, W)` latent; `call_backbone` packs it into the token sequence the
  transformer takes, builds the image and text position ids, and unpacks the output, with the stock pipeline's own
  static methods (isolated in the `_stock_*` helpers below). FLUX.1's trainer latent is the VAE latent itself
  (`16 x H/8 x W/8`), packed 2x2 into 64-channel tokens; FLUX.2's is the patchified, batch-normalised latent
  (`128 x H/16 x W/16`) that `Flux2KleinPipeline.prepare_latents` draws, flattened into tokens. Either way the
  initial noise is drawn in the same shape as the stock pipeline draws it, so a generator gives the same start.
- **Time.** The transformer takes `timestep / 1000` (it multiplies by 1000 inside), like the stock pipelines.
- **Grid.** The teachers' schedulers use resolution-dependent ("dynamic") shifting: the default student grid is the
  teacher scheduler's own timesteps for `num_steps` steps at the training resolution, with `mu` computed from the
  image sequence length exactly as the stock pipeline computes it (`calculate_shift` for FLUX.1,
  `compute_empirical_mu` for FLUX.2, which also depends on the step count).
- **Guidance.** FLUX.1 [dev] is guidance-distilled: no two-pass CFG but a guidance embedding. The real score is one
  pass at embedding `real_guidance_scale` (jittered per generator update); the student and the fake score run at the
  fixed `guidance_embedding_scale`. FLUX.2 [klein] base has no guidance embedding (`guidance_embeds=False`; the stock
  pipeline passes `guidance=None`) and uses true two-pass CFG against the empty prompt (its `negative_prompt = ""`)
  when `guidance_scale > 1`, so the real score is the default two-pass CFG.
- **Decode.** FLUX.1: `latents / scaling_factor + shift_factor` (the base decode). FLUX.2: undo the VAE's batch
  norm with its running statistics, unpatchify, decode: as `Flux2KleinPipeline.__call__` does, differentiably.
"""

from abc import abstractmethod

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..lora_formats import TRANSFORMER_STYLE
from ..pipelines.scheduling_dmdr import shifted_flow_grid
from .base import ModelFamily


# diffusers' own FLUX.1 LoRA recipe: the default `target_modules` of
# examples/dreambooth/train_dreambooth_lora_flux.py (attention of both streams and the double blocks' feed-forwards).
FLUX_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# diffusers' own FLUX.2 [klein] LoRA recipe: the default `target_modules` of
# examples/dreambooth/train_dreambooth_lora_flux2_klein.py (double-block attention, the single blocks' fused
# QKV+MLP projection and their attention outputs, listed per block up to 24 single blocks as there; the double
# blocks' `attn.to_out` is a ModuleList, so the single blocks' `to_out` Linear must be named by path).
FLUX2_LORA_TARGETS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "to_qkv_mlp_proj",
    *(f"single_transformer_blocks.{index}.attn.to_out" for index in range(24)),
)


# ----------------------------------------------------------------------------------------------------------------
# The stock pipelines' private latent helpers, isolated here (tests/test_families_flux.py checks them against the
# stock pipelines so that a change in diffusers fails loudly).
# ----------------------------------------------------------------------------------------------------------------
def _stock_flux_pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1: `(B, C, H, W)` -> 2x2-packed tokens `(B, H/2 * W/2, 4C)` and the image position ids `(H/2 * W/2, 3)`."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    return packed, image_ids


def _stock_flux_unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.1: inverse of `_stock_flux_pack` for a latent of spatial size `(height, width)`."""
    from diffusers import FluxPipeline

    # `_unpack_latents` takes the pixel size and the VAE factor; factor 1 makes the latent size the pixel size.
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def _stock_flux2_pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2: patchified `(B, C, H, W)` -> tokens `(B, H * W, C)` and the image position ids `(B, H * W, 4)`."""
    from diffusers import Flux2KleinPipeline

    image_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device)
    return Flux2KleinPipeline._pack_latents(latents), image_ids


def _stock_flux2_text_ids(prompt_embeds: torch.Tensor) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(prompt_embeds.device)


def _flux2_unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX.2: tokens `(B, H * W, C)` back to `(B, C, H, W)`: the inverse of `_pack_latents`, equal to the stock
    `_unpack_latents_with_ids` for the raster-order ids `_prepare_latent_ids` builds (a test checks it), without its
    per-sample scatter."""
    batch, _, channels = tokens.shape
    return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)


def _stock_flux2_unpatchify(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._unpatchify_latents(latents)


# ----------------------------------------------------------------------------------------------------------------
# Dynamic shift
# ----------------------------------------------------------------------------------------------------------------
def flux_image_seq_len(resolution: int, vae_scale_factor: int) -> int:
    """Tokens of a square `resolution` image in both FLUX families: one per 2x2 patch of the latent, as the stock
    `prepare_latents` makes them (`2 * (resolution // (vae_scale_factor * 2))` latent pixels a side)."""
    side = 2 * (int(resolution) // (vae_scale_factor * 2))
    return (side // 2) ** 2


def teacher_scheduler_timesteps(scheduler_config: dict, num_steps: int, mu: float | None) -> list[float]:
    r"""The teacher scheduler's own timesteps (model units) for `num_steps` steps, set as the stock FLUX pipelines set
    them: `sigmas = linspace(1, 1/N, N)` passed to `set_timesteps(sigmas=..., mu=mu)`. With `use_dynamic_shifting`
    the scheduler warps them as `e^mu / (e^mu + (1/s - 1))` (exponential time shift); without it, by its static
    `shift`. The scheduler class is the one the config names (`_class_name`)."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    scheduler = scheduler_class.from_config(dict(scheduler_config))
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return [float(timestep) for timestep in scheduler.timesteps]


class DynamicShiftFlowFamily(ModelFamily):
    """A flow-matching transformer whose teacher scheduler may shift by resolution: the default student grid is the
    teacher scheduler's own grid at the training resolution (subclasses say how the stock pipeline computes `mu`)."""

    backbone_name = "transformer"
    is_flow = True
    default_backward_simulation = "ode"
    default_resolution = 1024
    latent_patch_size = 2
    grid_rule = "teacher-scheduler"
    comfy_lora_style = TRANSFORMER_STYLE
    # The stock pipelines' default text length (T5 for FLUX.1, Qwen3 for FLUX.2).
    max_prompt_tokens = 512

    @abstractmethod
    def dynamic_shift_mu(
        self, resolution: int, num_steps: int, scheduler_config: dict, vae_scale_factor: int = 8
    ) -> float | None:
        """`mu` of the stock pipeline at `resolution` and `num_steps` (None when the scheduler shifts statically)."""

    # The tokenizer whose length limit caps the prompt (FLUX.1: T5's `tokenizer_2`; FLUX.2: Qwen's `tokenizer`).
    text_tokenizer_name = "tokenizer"

    def max_sequence_length(self, pipeline) -> int:
        """The prompt length in tokens: the stock default (512), or the tokenizer's own limit when that is lower (the
        released tokenizers allow 512 or more; tiny test tokenizers less). The exported pipeline passes the same value
        as `max_sequence_length`, so training and inference encode prompts alike."""
        tokenizer = getattr(pipeline, self.text_tokenizer_name)
        return int(min(self.max_prompt_tokens, tokenizer.model_max_length))

    def export_call_defaults(self, config, pipeline) -> dict:
        # The prompt length the trainer encoded with (the stock pipelines default to 512); without the pipeline (the
        # model card), the stock default.
        length = self.max_prompt_tokens if pipeline is None else self.max_sequence_length(pipeline)
        return {"max_sequence_length": length}

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        """The static SD3-style grid of an explicit `shift` (the default grid needs the teacher's scheduler: see
        `student_grid`)."""
        if shift is None:
            raise ValueError(
                f"The {self.name} default grid follows the teacher's scheduler at the training resolution "
                "(`student_grid`); without those, give an explicit `shift`."
            )
        return shifted_flow_grid(num_steps, shift)

    def student_grid(
        self, num_steps: int, shift: float | None, scheduler_config: dict, resolution: int, vae_scale_factor: int
    ) -> tuple[list[float], dict]:
        """An explicit `shift` gives the SD3-style static grid; otherwise the teacher scheduler's own `num_steps`-step
        timesteps at `resolution` (what the stock pipeline would sample with), recorded with its `mu` (`grid_mu`)."""
        if shift is not None:
            return shifted_flow_grid(num_steps, shift), {}
        mu = self.dynamic_shift_mu(resolution, num_steps, scheduler_config, vae_scale_factor)
        return teacher_scheduler_timesteps(scheduler_config, num_steps, mu), {"grid_mu": mu}

    def config_latent_channels(self, backbone_config: dict, vae_config: dict) -> tuple[int | None, int]:
        # The transformer takes 2x2 patches of the VAE latent: 4x its channels.
        return backbone_config.get("in_channels"), 4 * vae_config.get("latent_channels", 16)


class FluxFamily(DynamicShiftFlowFamily):
    """FLUX.1 [dev]: MMDiT with a guidance embedding, CLIP (pooled) + T5 text encoders, 2x2-packed latents."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    student_lora_targets = FLUX_LORA_TARGETS
    fake_lora_targets = FLUX_LORA_TARGETS
    card_tags = ("flux", "flux-diffusers")
    # `FluxPipeline.__call__`'s default `guidance_scale`: the embedding FLUX.1 [dev] samples at by default.
    default_guidance_embedding = 3.5
    text_tokenizer_name = "tokenizer_2"

    def dynamic_shift_mu(
        self, resolution: int, num_steps: int, scheduler_config: dict, vae_scale_factor: int = 8
    ) -> float | None:
        """`FluxPipeline`'s `calculate_shift`: linear in the image sequence length."""
        if not scheduler_config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return float(
            calculate_shift(
                flux_image_seq_len(resolution, vae_scale_factor),
                scheduler_config.get("base_image_seq_len", 256),
                scheduler_config.get("max_image_seq_len", 4096),
                scheduler_config.get("base_shift", 0.5),
                scheduler_config.get("max_shift", 1.15),
            )
        )

    def check_teacher(self, model_index: dict, source: str, revision: str | None = None) -> None:
        from .base import read_component_config

        transformer = read_component_config(source, self.backbone_name, revision)
        if not transformer.get("guidance_embeds", False):
            raise ValueError(
                f"--pretrained_model_name_or_path {source} is a FluxPipeline whose transformer has no guidance "
                "embedding (`guidance_embeds: false`, e.g. FLUX.1 [schnell], which is already step-distilled). The "
                "flux family distils the guidance-distilled FLUX.1 [dev] (black-forest-labs/FLUX.1-dev)."
            )

    # -- per-step work -------------------------------------------------------------------------------------------
    def latent_channels(self, backbone) -> int:
        # The transformer takes 2x2 patches of the VAE latent: 4x its channels.
        return backbone.config.in_channels // 4

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length(pipeline),
            )
        # The text position ids (all zeros) carry no batch dimension; `call_backbone` rebuilds them.
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}

    def export_call_defaults(self, config, pipeline) -> dict:
        # The student samples at the embedding it was trained at.
        return {**super().export_call_defaults(config, pipeline), "guidance_scale": config.guidance_embedding_scale}

    def with_guidance_embedding(self, condition: dict, guidance_scale: float) -> dict:
        # One value per sample, float32, as `FluxPipeline.__call__` builds it (`torch.full([1], scale).expand(B)`).
        batch = condition["encoder_hidden_states"].shape[0]
        device = condition["encoder_hidden_states"].device
        guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        return {**condition, "guidance": guidance}

    def real_score_x0(
        self, denoiser, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict, uncondition: dict, scale
    ) -> torch.Tensor:
        # Guidance-distilled: one backbone pass at guidance embedding `scale`, no unconditional branch.
        return denoiser(sample, noise_level, self.with_guidance_embedding(condition, scale))

    def step_noise(self, sample: torch.Tensor, generator) -> torch.Tensor:
        # `FluxPipeline` steps on 2x2-packed tokens: draw there, unpack.
        batch, channels, height, width = sample.shape
        shape = (batch, (height // 2) * (width // 2), channels * 4)
        tokens = randn_tensor(shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return _stock_flux_unpack(tokens, height, width)

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        if "guidance" not in condition:
            raise ValueError(
                "FLUX.1 [dev] needs a guidance embedding: build the condition with `with_guidance_embedding`."
            )
        height, width = sample.shape[-2:]
        tokens, image_ids = _stock_flux_pack(sample)
        prompt_embeds = condition["encoder_hidden_states"]
        # `FluxPipeline.encode_prompt` makes these: zeros, one row per text token, in the text encoder's dtype.
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=sample.device, dtype=prompt_embeds.dtype)
        output = backbone(
            hidden_states=tokens,
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=condition["guidance"],
            pooled_projections=condition["pooled_projections"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return _stock_flux_unpack(output, height, width)


class Flux2KleinFamily(DynamicShiftFlowFamily):
    """FLUX.2 [klein] base: MMDiT without guidance embedding, a Qwen3 text encoder, patchified batch-normed latents,
    true two-pass CFG against the empty prompt (the base class's real score)."""

    name = "flux2"
    pipeline_class_name = "Flux2KleinPipeline"
    student_lora_targets = FLUX2_LORA_TARGETS
    fake_lora_targets = FLUX2_LORA_TARGETS
    card_tags = ("flux2", "flux2-klein")

    def dynamic_shift_mu(
        self, resolution: int, num_steps: int, scheduler_config: dict, vae_scale_factor: int = 8
    ) -> float | None:
        """`Flux2KleinPipeline`'s empirical `mu`, a function of the image sequence length and the step count."""
        if not scheduler_config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return float(compute_empirical_mu(flux_image_seq_len(resolution, vae_scale_factor), num_steps))

    def check_teacher(self, model_index: dict, source: str, revision: str | None = None) -> None:
        if model_index.get("is_distilled", False):
            raise ValueError(
                f"--pretrained_model_name_or_path {source} is a step-distilled FLUX.2 [klein] (`is_distilled: true` "
                "in model_index.json; its pipeline ignores CFG). Distil the base model instead, e.g. "
                "black-forest-labs/FLUX.2-klein-base-4B."
            )

    def latent_channels(self, backbone) -> int:
        # The trainer keeps the patchified latent the transformer takes (2x2 patches already folded into channels).
        return backbone.config.in_channels

    def latent_shape(
        self, backbone, vae_scale_factor: int, height: int, width: int | None = None
    ) -> tuple[int, int, int]:
        # `Flux2KleinPipeline.prepare_latents`: `(4 C, H / (2 f), W / (2 f))` for the VAE factor f.
        width = height if width is None else width
        return (
            self.latent_channels(backbone),
            int(height) // (vae_scale_factor * 2),
            int(width) // (vae_scale_factor * 2),
        )

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length(pipeline),
            )
        return {"encoder_hidden_states": prompt_embeds}

    def step_noise(self, sample: torch.Tensor, generator) -> torch.Tensor:
        # `Flux2KleinPipeline` steps on the flattened tokens `(B, H * W, C)`: draw there, unpack.
        batch, channels, height, width = sample.shape
        tokens = randn_tensor(
            (batch, height * width, channels), generator=generator, device=sample.device, dtype=sample.dtype
        )
        return _flux2_unpack(tokens, height, width)

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        height, width = sample.shape[-2:]
        tokens, image_ids = _stock_flux2_pack(sample)
        prompt_embeds = condition["encoder_hidden_states"]
        output = backbone(
            hidden_states=tokens,
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=_stock_flux2_text_ids(prompt_embeds),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return _flux2_unpack(output[:, : tokens.shape[1]], height, width)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = _stock_flux2_unpatchify(latents * std + mean)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
