"""UNet families: SDXL (text_time conditioning, two CLIP encoders) and SD1.5 (one CLIP encoder)."""

import torch

from ..lora_formats import UNET_STYLE
from ..pipelines.scheduling_dmdr import ddpm_student_grid
from .base import ModelFamily


# The UNet modules the released SDXL guidance LoRA covers: attention, feed-forward, resnet convs, time-embedding
# projections and the down/upsamplers (the same list as diffusers' LCM-LoRA example).
UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
# DMD2's one-step SDXL student is conditioned on timestep 399 with a pure-noise input.
SDXL_ONE_STEP_TIMESTEP = 399.0


class SDXLFamily(ModelFamily):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    backbone_name = "unet"
    default_backward_simulation = "sde"
    default_resolution = 1024
    student_lora_targets = UNET_LORA_TARGETS
    fake_lora_targets = UNET_LORA_TARGETS
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    comfy_lora_style = UNET_STYLE
    grid_rule = "ddpm-trailing"
    supports_non_square = True

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        if num_steps == 1:
            return [SDXL_ONE_STEP_TIMESTEP]
        return ddpm_student_grid(num_steps)

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        # SDXL micro-conditioning: original size, crop top-left, target size, as (height, width) pairs.
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=prompt_embeds.dtype)
        time_ids = time_ids.to(device).repeat(len(prompts), 1)
        return {
            "encoder_hidden_states": prompt_embeds,
            "added_cond_kwargs": {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids},
        }

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        return backbone(sample, timestep, return_dict=False, **condition)[0]


class SD15Family(SDXLFamily):
    """Stable Diffusion 1.x/2.x: one CLIP encoder, no micro-conditioning, the DDPM grid."""

    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    default_resolution = 512
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        return ddpm_student_grid(num_steps)

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": prompt_embeds}
