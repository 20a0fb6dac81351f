"""Z-Image family (`ZImagePipeline`): single-stream DiT, rectified flow, a Qwen3 text encoder.

What differs from SD3, each as the stock pipeline (diffusers 0.42 `pipelines/z_image/pipeline_z_image.py`) does it:
- the transformer takes lists: one `(C, 1, H, W)` latent and one unpadded `(L_i, D)` prompt embedding per sample;
- it is fed `(1000 - timestep) / 1000` (1 is clean) and predicts the negative of the flow velocity;
- CFG is `cond + g (cond - uncond)` with the empty negative prompt, so Z-Image's `guidance_scale = g` is DMDR's
  `real_guidance_scale = 1 + g` (the plain guidance of [`~denoisers.apply_guidance`]); its `cfg_normalization` and
  `cfg_truncation` are off by default and not reproduced;
- the default grid is the teacher scheduler's own schedule of `linspace(1, 1 / N, N)` (see `flow_grid.py`).
"""

import sys

import torch

from ..lora_formats import TRANSFORMER_STYLE
from .base import ModelFamily
from .flow_grid import image_sequence_length, static_shift_config, stock_flow_grid


# diffusers' own Z-Image LoRA example (examples/dreambooth/train_dreambooth_lora_z_image.py, `--lora_layers` default):
# the attention projections of every block.
ZIMAGE_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def pad_prompt_embeds(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of `(L_i, D)` embeddings as one zero-padded `(B, length, D)` tensor and its `(B, length)` bool mask."""
    padded = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for row, embed in enumerate(embeds):
        padded[row, : embed.shape[0]] = embed
        mask[row, : embed.shape[0]] = True
    return padded, mask


def unpad_prompt_embeds(padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of [`pad_prompt_embeds`]: `padded[i][mask[i]]`, exactly how the stock pipeline cuts its embeddings."""
    return [padded[row][mask[row]] for row in range(padded.shape[0])]


class ZImageFamily(ModelFamily):
    name = "zimage"
    pipeline_class_name = "ZImagePipeline"
    backbone_name = "transformer"
    is_flow = True
    # Every released DMDR text-to-image script on a flow model samples the student by Euler ODE.
    default_backward_simulation = "ode"
    default_resolution = 1024
    # The stock pipeline requires height and width divisible by the VAE factor x 2 (2x2 patches).
    latent_patch_size = 2
    grid_rule = "teacher-scheduler"
    student_lora_targets = ZIMAGE_LORA_TARGETS
    fake_lora_targets = ZIMAGE_LORA_TARGETS
    card_tags = ("z-image", "z-image-diffusers")
    comfy_lora_style = TRANSFORMER_STYLE
    # The stock pipeline's `max_sequence_length` default; conditioning is padded to it so batches concatenate.
    max_prompt_tokens = 512
    # `ZImagePipeline.encode_prompt` uses `""` for every prompt when no negative prompt is given.
    negative_prompt = ""

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        """Z-Image's grid at the static shift of its released scheduler config (3.0) when no teacher config is at
        hand; runs use [`student_grid`], which reads the teacher's own scheduler."""
        config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0 if shift is None else shift}
        return self.student_grid(num_steps, None, config, self.default_resolution, 8)[0]

    def student_grid(
        self, num_steps: int, shift: float | None, scheduler_config: dict, resolution: int, vae_scale_factor: int
    ) -> tuple[list[float], dict]:
        """The teacher scheduler's schedule of the stock default sigmas at `resolution` (`--shift` replaces the
        scheduler's own shifting by a static shift)."""
        stock = sys.modules[self.pipeline_class().__module__]
        if shift is not None:
            scheduler_config = static_shift_config(scheduler_config, shift)
        seq_len = image_sequence_length(resolution // vae_scale_factor)
        timesteps, mu = stock_flow_grid(
            scheduler_config, stock.get_default_z_image_sigmas(num_steps), seq_len, stock.calculate_shift
        )
        return timesteps, ({} if mu is None else {"grid_mu": mu})

    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        with torch.no_grad():
            # A copy: the stock `_encode_prompt` writes the chat-templated text into the list it is given.
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=list(prompts),
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_prompt_tokens,
            )
        padded, mask = pad_prompt_embeds(prompt_embeds, self.max_prompt_tokens)
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask}

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        latents = list(sample.to(backbone.dtype).unsqueeze(2).unbind(dim=0))
        prompt_embeds = unpad_prompt_embeds(condition["prompt_embeds"], condition["prompt_embeds_mask"])
        output = backbone(latents, (1000 - timestep) / 1000, prompt_embeds, return_dict=False)[0]
        # The stock pipeline stacks the per-sample outputs and negates them into the flow velocity `noise - x0`.
        return -torch.stack(output, dim=0).squeeze(2)
