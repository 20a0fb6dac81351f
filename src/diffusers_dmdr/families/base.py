"""What every model family provides to the trainer."""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipelines.scheduling_dmdr import DMDRScheduler


@dataclass
class TeacherComponents:
    """The loaded teacher: a stock diffusers pipeline (text encoders, tokenizers, VAE, scheduler) and its backbone.

    `pipeline` keeps the teacher's own `encode_prompt`, so prompts are encoded exactly as at inference.
    """

    family: "ModelFamily"
    pipeline: object
    backbone: torch.nn.Module
    vae: torch.nn.Module
    source: str


def student_scheduler_for(
    teacher: TeacherComponents,
    timesteps: list[float],
    backward_simulation: str | None,
    shift: float | None,
    x0_noise_level: float = 0.0,
) -> DMDRScheduler:
    """The student's sampler: the teacher's noise schedule, the student grid, the re-noising rule of the backward
    simulation (`ode` -> deterministic; `None` -> the family's default) and, for flow models, the noise level where
    the clean estimate stops (`x0_noise_level`)."""
    teacher_config = teacher.pipeline.scheduler.config
    mode = backward_simulation or teacher.family.default_backward_simulation
    common = {
        "num_train_timesteps": teacher_config.get("num_train_timesteps", 1000),
        "training_timesteps": timesteps,
        "deterministic": mode == "ode",
    }
    if teacher.family.is_flow:
        return DMDRScheduler(prediction_type="flow", grid_shift=shift, x0_noise_level=x0_noise_level, **common)
    # Everything that shapes the teacher's alpha_bar is carried over: dropping `trained_betas` or
    # `rescale_betas_zero_snr` would train and sample a zero-terminal-SNR teacher on the wrong noise levels.
    return DMDRScheduler(
        prediction_type=teacher_config.get("prediction_type", "epsilon"),
        beta_start=teacher_config.get("beta_start", 0.00085),
        beta_end=teacher_config.get("beta_end", 0.012),
        beta_schedule=teacher_config.get("beta_schedule", "scaled_linear"),
        trained_betas=teacher_config.get("trained_betas"),
        rescale_betas_zero_snr=bool(teacher_config.get("rescale_betas_zero_snr", False)),
        **common,
    )


def read_teacher_config(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """Read `model_index.json` (local folder or Hub), without loading weights; clear errors on a bad path."""
    path = Path(pretrained_model_name_or_path)
    if path.exists() or pretrained_model_name_or_path.startswith((".", "/", "~")):
        index = path.expanduser() / "model_index.json"
        if not path.expanduser().is_dir():
            raise FileNotFoundError(
                f"--pretrained_model_name_or_path {pretrained_model_name_or_path} does not exist; give a diffusers "
                "pipeline folder or a Hub model id."
            )
        if not index.is_file():
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} has no model_index.json: it is not a diffusers pipeline folder "
                "(save one with `pipeline.save_pretrained(folder)`)."
            )
        return json.loads(index.read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    except Exception as error:
        raise FileNotFoundError(
            f"Could not read model_index.json of {pretrained_model_name_or_path!r} ({type(error).__name__}: {error}). "
            "Check the Hub id and your network (HF_HUB_OFFLINE), or give a local pipeline folder."
        ) from error


def read_component_config(pretrained_model_name_or_path: str, subfolder: str, revision: str | None = None) -> dict:
    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        config_file = path / subfolder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} has no {subfolder}/config.json.")
        return json.loads(config_file.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(pretrained_model_name_or_path, "config.json", subfolder=subfolder, revision=revision)
    return json.loads(Path(file).read_text(encoding="utf-8"))


def concat_conditions(first: dict, second: dict) -> dict:
    """Batch-concatenate two conditioning dicts of the same structure (conditional + unconditional for CFG)."""
    merged = {}
    for key, value in first.items():
        if isinstance(value, dict):
            merged[key] = concat_conditions(value, second[key])
        else:
            merged[key] = torch.cat([value, second[key]])
    return merged


def repeat_condition(condition: dict, batch_size: int) -> dict:
    """Expand a batch-1 conditioning dict (the empty prompt) to `batch_size`."""
    repeated = {}
    for key, value in condition.items():
        if isinstance(value, dict):
            repeated[key] = repeat_condition(value, batch_size)
        else:
            repeated[key] = value.expand(batch_size, *value.shape[1:])
    return repeated


class ModelFamily(ABC):
    """Base class: one subclass per diffusers pipeline class."""

    name: str
    pipeline_class_name: str
    backbone_name: str
    # Which backbone prediction the scheduler config implies: "ddpm" families read `prediction_type`.
    is_flow: bool = False
    default_backward_simulation: str = "sde"
    default_resolution: int = 1024
    # LoRA targets of the student and of the fake score (released recipes).
    student_lora_targets: tuple[str, ...] = ()
    fake_lora_targets: tuple[str, ...] = ()

    # -- configuration, before weights -----------------------------------------------------------------------------
    def vae_scale_factor(self, source: str, revision: str | None = None) -> int:
        vae_config = read_component_config(source, "vae", revision)
        return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @abstractmethod
    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        """The student grid in model units, noisiest first."""

    # -- loading --------------------------------------------------------------------------------------------------
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_teacher(
        self,
        source: str,
        revision: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TeacherComponents:
        """Load the teacher pipeline on the CPU directly in `dtype` (the training dtype: no float32 copy is made);
        the trainer places it."""
        pipeline = self.pipeline_class().from_pretrained(source, revision=revision, variant=variant, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        backbone = getattr(pipeline, self.backbone_name)
        return TeacherComponents(family=self, pipeline=pipeline, backbone=backbone, vae=pipeline.vae, source=source)

    def load_backbone(
        self, source: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """Load only the teacher's backbone (the trainable float32 copy of a full student)."""
        import diffusers

        class_name = read_component_config(source, self.backbone_name, revision)["_class_name"]
        backbone_class = getattr(diffusers, class_name)
        return backbone_class.from_pretrained(
            source, subfolder=self.backbone_name, revision=revision, variant=variant, dtype=dtype
        )

    def text_encoders(self, pipeline) -> list[torch.nn.Module]:
        return [
            getattr(pipeline, name)
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipeline, name, None) is not None
        ]

    # -- per-step work -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        """Conditioning kwargs of the backbone for `prompts` (no grad; text encoders are frozen)."""

    @abstractmethod
    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        """The backbone's raw prediction (eps, v or flow velocity) for `sample` at model `timestep`."""

    def latent_channels(self, backbone) -> int:
        return backbone.config.in_channels

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in `[0, 1]`, differentiable (the reward path back-propagates through it)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def lora_save_kwargs(self, lora_state_dict: dict) -> dict:
        """Keyword arguments of the pipeline's `save_lora_weights` for a backbone LoRA state dict."""
        return {f"{self.backbone_name}_lora_layers": lora_state_dict}
