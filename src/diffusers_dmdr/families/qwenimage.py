"""Qwen-Image family (`QwenImagePipeline`): dual-stream MMDiT, rectified flow, a Qwen2.5-VL text encoder.

What differs from SD3, each as the stock pipeline (diffusers 0.42 `pipelines/qwenimage/pipeline_qwenimage.py`) does it:
- the VAE is the causal 3-D `AutoencoderKLQwenImage`: latents are `(B, C, 1, H, W)` with per-channel `latents_mean` /
  `latents_std`; the trainer keeps `(B, C, H, W)` and this family packs 2x2 patches into `(B, H W / 4, 4 C)` tokens
  with their `img_shapes` for every backbone call, and unpacks the output;
- prompts go through the pipeline's system-prompt template; embeddings are padded here to a fixed length with their
  attention mask (the transformer masks padded tokens), so batches of different prompt lengths concatenate;
- the transformer is fed `timestep / 1000` and no guidance embedding (Qwen-Image is not guidance-distilled);
- CFG is `true_cfg_scale` with a negative prompt (the pipeline enables CFG only when one is given; its docstring
  names `" "`), and the combined prediction is rescaled per token to the conditional prediction's norm;
- the default grid is the teacher scheduler's dynamic-shift schedule at the training resolution (see `flow_grid.py`).

The stock pipeline's scheduler steps on packed tokens, so the student's sampler draws its re-noising noise in that
layout (`step_noise`): the exported pipeline reproduces the `sde` sampler too for the same generator.
"""

import sys

import numpy as np
import torch

from ..lora_formats import TRANSFORMER_STYLE
from ..method.denoisers import guided_x0
from .base import ModelFamily, read_component_config
from .flow_grid import image_sequence_length, static_shift_config, stock_flow_grid


# diffusers' own Qwen-Image LoRA example (examples/dreambooth/train_dreambooth_lora_qwen_image.py, `--lora_layers`
# default): the image-stream attention projections of every block.
QWENIMAGE_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# The negative prompt the real score's unconditional branch uses (the stock docstring's "empty" negative prompt).
QWENIMAGE_NEGATIVE_PROMPT = " "
# Qwen-Image's released `scheduler_config.json` (used only when no teacher config is at hand).
QWENIMAGE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` latents as the stock pipeline's `(B, H W / 4, 4 C)` tokens of 2x2 patches."""
    from diffusers import QwenImagePipeline

    batch_size, channels, height, width = latents.shape
    return QwenImagePipeline._pack_latents(latents, batch_size, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of [`pack_latents`] for a `height` x `width` latent (the stock `_unpack_latents`, frame axis dropped)."""
    from diffusers import QwenImagePipeline

    # The stock helper takes pixel sizes and the VAE factor; a factor of 1 makes them latent sizes.
    return QwenImagePipeline._unpack_latents(tokens, height, width, 1)[:, :, 0]


def rescaled_true_cfg(cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
    r"""Qwen-Image's true CFG on `(B, C, H, W)` outputs: `comb = uncond + s (cond - uncond)`, then each packed token
    rescaled to the conditional prediction's norm, `comb * |cond|_token / |comb|_token`."""
    height, width = cond_output.shape[-2:]
    cond, uncond = pack_latents(cond_output), pack_latents(uncond_output)
    combined = uncond + scale * (cond - uncond)
    combined = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return unpack_latents(combined, height, width)


class QwenImageFamily(ModelFamily):
    name = "qwenimage"
    pipeline_class_name = "QwenImagePipeline"
    backbone_name = "transformer"
    is_flow = True
    # Every released DMDR text-to-image script on a flow model samples the student by Euler ODE.
    default_backward_simulation = "ode"
    default_resolution = 1024
    # The stock pipeline requires height and width divisible by the VAE factor x 2 (2x2 patches).
    latent_patch_size = 2
    grid_rule = "teacher-scheduler"
    student_lora_targets = QWENIMAGE_LORA_TARGETS
    fake_lora_targets = QWENIMAGE_LORA_TARGETS
    card_tags = ("qwen-image", "qwen-image-diffusers")
    comfy_lora_style = TRANSFORMER_STYLE
    # The stock `__call__`'s `max_sequence_length` default; conditioning is padded to it so batches concatenate.
    max_prompt_tokens = 512
    negative_prompt = QWENIMAGE_NEGATIVE_PROMPT

    def real_score_x0(
        self, denoiser, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict, uncondition: dict, scale
    ) -> torch.Tensor:
        """Two-pass CFG combined as the stock pipeline combines it (per-token norm rescale), then `x0`."""
        return guided_x0(
            denoiser, sample, noise_level, condition, uncondition, scale, combine_predictions=rescaled_true_cfg
        )

    def step_noise(self, sample: torch.Tensor, generator) -> torch.Tensor:
        """Re-noising noise drawn as the stock pipeline's scheduler draws it, on packed `(B, H W / 4, 4 C)` tokens,
        then unpacked: the exported pipeline's stochastic (`sde`) sampler then makes the trainer's draws."""
        from diffusers.utils.torch_utils import randn_tensor

        batch_size, channels, height, width = sample.shape
        shape = (batch_size, (height // 2) * (width // 2), channels * 4)
        tokens = randn_tensor(shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return unpack_latents(tokens, height, width)

    def vae_scale_factor(self, source: str, revision: str | None = None) -> int:
        # As `QwenImagePipeline.__init__`: the 3-D VAE's spatial factor is 2 per temporal-downsample stage.
        vae_config = read_component_config(source, "vae", revision)
        return 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))

    def latent_channels(self, backbone) -> int:
        # `in_channels` counts the packed 2x2 patch: 4 latent channels per token channel.
        return backbone.config.in_channels // 4

    def config_latent_channels(self, backbone_config: dict, vae_config: dict) -> tuple[int | None, int]:
        in_channels = backbone_config.get("in_channels")
        return (None if in_channels is None else in_channels // 4), vae_config.get("z_dim", 16)

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        """The grid of Qwen-Image's released scheduler config at 1024 px when no teacher config is at hand; runs use
        [`student_grid`], which reads the teacher's own scheduler."""
        return self.student_grid(num_steps, shift, dict(QWENIMAGE_SCHEDULER_CONFIG), self.default_resolution, 8)[0]

    def student_grid(
        self, num_steps: int, shift: float | None, scheduler_config: dict, resolution: int, vae_scale_factor: int
    ) -> tuple[list[float], dict]:
        """The teacher scheduler's schedule of the stock default sigmas with `mu` for `resolution` (`--shift` replaces
        the dynamic shift by a static one)."""
        stock = sys.modules[self.pipeline_class().__module__]
        if shift is not None:
            scheduler_config = static_shift_config(scheduler_config, shift)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps).tolist()
        seq_len = image_sequence_length(resolution // vae_scale_factor)
        timesteps, mu = stock_flow_grid(scheduler_config, sigmas, seq_len, stock.calculate_shift)
        return timesteps, ({} if mu is None else {"grid_mu": mu})

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, prompt_embeds_mask = pipeline.encode_prompt(
                prompt=list(prompts), device=device, max_sequence_length=self.max_prompt_tokens
            )
        batch_size, length, width = prompt_embeds.shape
        padded = prompt_embeds.new_zeros(batch_size, self.max_prompt_tokens, width)
        padded[:, :length] = prompt_embeds
        mask = torch.zeros(batch_size, self.max_prompt_tokens, dtype=torch.long, device=prompt_embeds.device)
        # The stock encoder returns no mask when no prompt of the batch is padded.
        mask[:, :length] = 1 if prompt_embeds_mask is None else prompt_embeds_mask
        return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        batch_size, _, height, width = sample.shape
        img_shapes = [[(1, height // 2, width // 2)]] * batch_size
        output = backbone(
            hidden_states=pack_latents(sample.to(backbone.dtype)),
            timestep=timestep.to(backbone.dtype) / 1000,
            encoder_hidden_states=condition["encoder_hidden_states"],
            encoder_hidden_states_mask=condition["encoder_hidden_states_mask"],
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """As the stock pipeline: de-normalise per channel, decode one frame, map `[-1, 1]` to `[0, 1]`."""
        latents = latents.to(vae.dtype).unsqueeze(2)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        images = vae.decode(latents / latents_std + latents_mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
