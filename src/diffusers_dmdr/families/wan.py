"""Wan family (`WanPipeline`): text-to-video DiT on 5-D video latents, rectified flow, a UMT5 text encoder.

Supported teachers: Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 TI2V-5B in text-to-video mode, each as the stock pipeline
(diffusers 0.42 `pipelines/wan/pipeline_wan.py`) runs it:
- latents are `(B, C, F, H, W)`: `F = (num_frames - 1) / t + 1` latent frames for the VAE's temporal factor `t` (4),
  `H, W` the pixel size over its spatial factor (8 for Wan 2.1, 16 for the Wan 2.2 VAE); the transformer cuts
  `(1, 2, 2)` patches, so the stock pipeline needs sizes divisible by 16 (Wan 2.1) or 32 (Wan 2.2), and
  `num_frames - 1` divisible by `t` (the stock pipeline rounds a bad count with a warning; the trainer refuses it
  before any weight loads, naming the nearest valid counts);
- per-channel `latents_mean` / `latents_std` of `AutoencoderKLWan` normalise the latents (the decode undoes them);
- the transformer is fed the timestep `1000 t` as is and predicts the flow velocity `noise - x0`; Wan 2.2 TI2V-5B's
  pipeline (`expand_timesteps=True`) feeds it one timestep per latent token, which this family repeats;
- CFG is `uncond + g (cond - uncond)` on the velocity, on for `guidance_scale > 1`, against the empty negative
  prompt (`encode_prompt` uses `""` when none is given): DMDR's plain two-pass guidance at `real_guidance_scale = g`;
- prompts are UMT5 embeddings zero-padded to `max_sequence_length = 512` (the stock call's default).

The grid rule: Wan's flow shift is static (`flow_shift` of the released `UniPCMultistepScheduler` config: 3.0 for
Wan 2.1 at 480p, 5.0 for Wan 2.2 TI2V-5B at 720p; `shift` of a `FlowMatchEulerDiscreteScheduler`), with no
resolution- or length-dependent `mu`. The student grid is the scheduler's `shifted_flow_grid` at the teacher
scheduler's shift (read from its config; `--shift` replaces it): the same grid at every training resolution and frame
count, which is why the shift, not the grid, is what a recipe changes with the resolution (3 for 480p, 5 for 720p).

Wan 2.2 T2V-A14B (two experts switched at `boundary_ratio`) is refused before any weight loads.
"""

import torch

from ..lora_formats import WAN_STYLE
from ..pipelines.scheduling_dmdr import shifted_flow_grid
from .base import ModelFamily, read_component_config


# The attention projections (self- and cross-attention) and the feed-forward layers of every block: the modules Wan
# LoRAs in the original key form carry (`self_attn.q/k/v/o`, `cross_attn.q/k/v/o`, `ffn.0`, `ffn.2`; see diffusers'
# `_convert_non_diffusers_wan_lora_to_diffusers`), so the ComfyUI-format file holds every trained module.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
# The stock call's default frame count (Wan 2.1 and 2.2 both sample 81 frames: 5 s at 16 fps, 21 latent frames).
WAN_DEFAULT_NUM_FRAMES = 81
# Wan 2.1 T2V at 480p (the released scheduler config's `flow_shift`): used only when no teacher config is at hand.
WAN_DEFAULT_SHIFT = 3.0
# The checkpoints this family distils (named in every refusal).
WAN_SUPPORTED_CHECKPOINTS = (
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers and Wan-AI/Wan2.2-TI2V-5B-Diffusers "
    "(text-to-video)"
)


def teacher_flow_shift(scheduler_config: dict) -> float:
    """The static shift of a Wan teacher's scheduler: `flow_shift` (UniPC / DPM++ with flow sigmas) or `shift`
    (`FlowMatchEulerDiscreteScheduler`), else Wan 2.1's 480p value."""
    for key in ("flow_shift", "shift"):
        if scheduler_config.get(key) is not None:
            return float(scheduler_config[key])
    return WAN_DEFAULT_SHIFT


def nearest_frame_counts(num_frames: int, temporal_factor: int) -> tuple[int, int]:
    """The valid frame counts (`(n - 1) % temporal_factor == 0`) just below and above `num_frames`."""
    lower = max(1, (num_frames - 1) // temporal_factor * temporal_factor + 1)
    return lower, lower + temporal_factor


def check_num_frames(num_frames: int, temporal_factor: int) -> None:
    """Refuse a frame count the VAE cannot encode exactly (one line, naming the nearest valid counts)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        lower, upper = nearest_frame_counts(max(num_frames, 1), temporal_factor)
        raise ValueError(
            f"--num_frames {num_frames}: the Wan VAE needs (num_frames - 1) divisible by its temporal factor "
            f"{temporal_factor}; use {lower} or {upper}."
        )


class WanFamily(ModelFamily):
    name = "wan"
    pipeline_class_name = "WanPipeline"
    backbone_name = "transformer"
    is_flow = True
    is_video = True
    # Every released DMDR script on a flow model samples the student by Euler ODE.
    default_backward_simulation = "ode"
    default_resolution = 480
    # The released models sample 480 x 832 (Wan 2.1) and 704 x 1280 (Wan 2.2 TI2V-5B): `--resolution H --width W`.
    supports_non_square = True
    # The transformer's (1, 2, 2) patches: sizes divisible by the VAE factor x 2 (the stock `check_inputs`' 16).
    latent_patch_size = 2
    grid_rule = "teacher-scheduler"
    student_lora_targets = WAN_LORA_TARGETS
    fake_lora_targets = WAN_LORA_TARGETS
    card_tags = ("wan", "wan-diffusers", "text-to-video")
    comfy_lora_style = WAN_STYLE
    # The stock `__call__`'s `max_sequence_length` default; embeddings come zero-padded to it.
    max_prompt_tokens = 512
    negative_prompt = ""
    # Set from the teacher pipeline's config when it loads (Wan 2.2 TI2V-5B: one timestep per latent token).
    expand_timesteps: bool = False

    # -- configuration, before weights -------------------------------------------------------------------------
    def check_teacher(self, model_index: dict, source: str, revision: str | None = None) -> None:
        """Refuse Wan 2.2 T2V-A14B (a high-noise and a low-noise expert switched at `boundary_ratio`)."""
        second_expert = model_index.get("transformer_2")
        has_second_expert = isinstance(second_expert, list | tuple) and any(item for item in second_expert)
        if has_second_expert or model_index.get("boundary_ratio") is not None:
            raise ValueError(
                f"{source} is a two-expert Wan 2.2 A14B pipeline (transformer_2 / boundary_ratio), which diffusers-dmdr "
                f"does not distil yet; supported Wan teachers: {WAN_SUPPORTED_CHECKPOINTS}."
            )

    def check_run_config(self, config) -> None:
        check_num_frames(self.num_frames_of(config), self.temporal_factor(config.pretrained_model_name_or_path))
        if config.reward_vae_model_name_or_path:
            raise ValueError(
                f"--reward_vae_model_name_or_path {config.reward_vae_model_name_or_path}: a tiny image autoencoder "
                "cannot decode Wan's video latents; drop it (the rewards use the Wan VAE's decode)."
            )

    def vae_scale_factor(self, source: str, revision: str | None = None) -> int:
        return int(read_component_config(source, "vae", revision).get("scale_factor_spatial", 8))

    def temporal_factor(self, source: str, revision: str | None = None) -> int:
        return int(read_component_config(source, "vae", revision).get("scale_factor_temporal", 4))

    @staticmethod
    def num_frames_of(config) -> int:
        return WAN_DEFAULT_NUM_FRAMES if config.num_frames is None else int(config.num_frames)

    def config_latent_channels(self, backbone_config: dict, vae_config: dict) -> tuple[int | None, int]:
        return backbone_config.get("in_channels"), vae_config.get("z_dim", 16)

    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        return shifted_flow_grid(num_steps, WAN_DEFAULT_SHIFT if shift is None else shift)

    def student_grid(
        self, num_steps: int, shift: float | None, scheduler_config: dict, resolution: int, vae_scale_factor: int
    ) -> tuple[list[float], dict]:
        """`shifted_flow_grid` at the teacher scheduler's static shift (`--shift` replaces it); no `mu`, so the grid
        is the same at every resolution and frame count."""
        return shifted_flow_grid(num_steps, teacher_flow_shift(scheduler_config) if shift is None else shift), {}

    # -- loading --------------------------------------------------------------------------------------------------
    def load_teacher(self, source, revision=None, variant=None, dtype=torch.float32, vae=None):
        teacher = super().load_teacher(source, revision=revision, variant=variant, dtype=dtype, vae=vae)
        # A folder saved without `model_index.json` checks (an in-memory pipeline) is refused here too.
        pipeline = teacher.pipeline
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            self.check_teacher({"boundary_ratio": 0.0}, source)
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
        return teacher

    def spatial_vae_factor(self, pipeline) -> int:
        return pipeline.vae_scale_factor_spatial

    def run_latent_shape(self, backbone, pipeline, config) -> tuple[int, ...]:
        """`(C, F, H, W)`: the stock `prepare_latents` shape for the run's size and frame count."""
        height, width = config.image_size
        factor = pipeline.vae_scale_factor_spatial
        latent_frames = (self.num_frames_of(config) - 1) // pipeline.vae_scale_factor_temporal + 1
        return (backbone.config.in_channels, latent_frames, height // factor, width // factor)

    def export_call_defaults(self, config, pipeline) -> dict:
        """The trained size and frame count (the stock defaults are 480 x 832 x 81), and CFG off."""
        height, width = config.image_size
        return {"height": height, "width": width, "num_frames": self.num_frames_of(config)}

    def export_init_kwargs(self, pipeline) -> dict:
        """Wan 2.2 TI2V-5B's pipeline flag: the exported `WanPipeline` must feed per-token timesteps too."""
        return {"expand_timesteps": True} if pipeline.config.get("expand_timesteps", False) else {}

    # -- per-step work -------------------------------------------------------------------------------------------
    def encode_prompts(self, pipeline, prompts: list[str], resolution, device: torch.device) -> dict:
        with torch.no_grad():
            prompt_embeds, _ = pipeline.encode_prompt(
                prompt=list(prompts),
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_prompt_tokens,
                device=device,
            )
        return {"encoder_hidden_states": prompt_embeds}

    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        timestep = timestep.to(sample.device).expand(sample.shape[0])
        if self.expand_timesteps:
            # As the stock loop: one timestep per latent token, `F * (H / 2) * (W / 2)` of them (2x2 patches).
            _, _, frames, height, width = sample.shape
            timestep = timestep[:, None].expand(-1, frames * (height // 2) * (width // 2))
        return backbone(
            hidden_states=sample.to(backbone.dtype),
            timestep=timestep,
            encoder_hidden_states=condition["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, F, H, W)` latents to a `(B, 3, frames, H, W)` video in `[0, 1]`, as the stock pipeline decodes
        (per-channel de-normalisation), differentiable."""
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        # The stock pipeline's own arithmetic (divide by the reciprocal std), so decodes match it bit for bit.
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / latents_std + latents_mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)
