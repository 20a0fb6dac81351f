"""SD3 family: MMDiT transformer, rectified flow, two CLIP encoders and T5."""

import torch

from ..lora_formats import TRANSFORMER_STYLE
from ..pipelines.scheduling_dmdr import shifted_flow_grid
from .base import ModelFamily


# Joint-attention projections: the released SD3-M / SD3.5-L student and guidance LoRAs.
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# SD3-Medium's training shift; SD3.5-Large recipes set 5.0.
SD3_DEFAULT_SHIFT = 3.0


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    backbone_name = "transformer"
    is_flow = True
    default_backward_simulation = "ode"
    default_resolution = 1024
    student_lora_targets = SD3_LORA_TARGETS
    fake_lora_targets = SD3_LORA_TARGETS
    card_tags = ("sd3", "sd3-diffusers")
    comfy_lora_style = TRANSFORMER_STYLE
    # The released scripts cap T5 prompts at 128 tokens (the stock pipeline pads to 256).
    max_prompt_tokens = 128
    grid_rule = "shifted-flow"

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        return shifted_flow_grid(num_steps, SD3_DEFAULT_SHIFT if shift is None else shift)

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_prompt_tokens,
            )
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        return backbone(hidden_states=sample, timestep=timestep, return_dict=False, **condition)[0]
