"""What every model family provides to the trainer."""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hub_cache import hub_cache_kwargs
from ..method.denoisers import guided_x0
from ..pipelines.pipeline_dmdr import STOCK_ROUTES, StockRoute
from ..pipelines.scheduling_dmdr import DMDRScheduler


# The pipeline components that hold text encoders, in every family's naming (the stock pipelines').
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
# How a family's default student grid is made (`ModelFamily.grid_rule`): the scheduler's `ddpm_student_grid`, its
# `shifted_flow_grid` (the released SD3 rule), its `shifted_linear_flow_grid` (the stock default sigmas at a static
# shift, no terminal stretch), or the teacher scheduler's own schedule at the training resolution.
GRID_RULES = ("ddpm-trailing", "shifted-flow", "shifted-linear", "teacher-scheduler")


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
    grid_origin: dict | None = None,
) -> DMDRScheduler:
    """The student's sampler: the teacher's noise schedule, the student grid, the re-noising rule of the backward
    simulation (`ode` -> deterministic; `None` -> the family's default) and, for flow models, the noise level where
    the clean estimate stops (`x0_noise_level`). `grid_origin` (from [`student_grid_for`]) goes into the config beside
    the grid: how a resolution-dependent default grid was derived (`grid_mu`)."""
    teacher_config = teacher.pipeline.scheduler.config
    mode = backward_simulation or teacher.family.default_backward_simulation
    common = {
        "num_train_timesteps": teacher_config.get("num_train_timesteps", 1000),
        "training_timesteps": timesteps,
        "deterministic": mode == "ode",
    }
    if teacher.family.is_flow:
        # A family's default grid may record the shift it was built with itself (`grid_origin["grid_shift"]`).
        origin = {"grid_shift": shift, **(grid_origin or {})}
        return DMDRScheduler(prediction_type="flow", x0_noise_level=x0_noise_level, **origin, **common)
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


def run_student_scheduler(teacher: TeacherComponents, config) -> DMDRScheduler:
    """The student's sampler of a run (`config`: a `DMDRConfig`): its grid from [`student_grid_for`] in the scheduler
    [`student_scheduler_for`] builds. The trainer and the export both ask this one function."""
    timesteps, grid_origin = student_grid_for(
        teacher.family, config, teacher.pipeline.scheduler.config, teacher.family.spatial_vae_factor(teacher.pipeline)
    )
    return student_scheduler_for(
        teacher, timesteps, config.backward_simulation, config.shift, config.flow_x0_noise_level, grid_origin
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
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, **hub_cache_kwargs())
    except Exception as error:
        raise FileNotFoundError(
            f"Could not read model_index.json of {pretrained_model_name_or_path!r} ({type(error).__name__}: {error}). "
            "Check the Hub id and your network (HF_HUB_OFFLINE), or give a local pipeline folder."
        ) from error


def student_grid_for(family: "ModelFamily", config, scheduler_config: dict, vae_scale_factor: int):
    """`(timesteps, grid_origin)` of a run: `--student_timesteps` as given, or the family's default grid for the
    teacher's scheduler config at `--resolution` (see [`ModelFamily.student_grid`])."""
    if config.released_bf16_grid:
        if not hasattr(family, "released_bf16_grid") or config.student_timesteps:
            raise ValueError(
                "--released_bf16_grid reproduces the released SD3-Medium / SD3.5-Large runs' bf16 grid: it needs the "
                f"sd3 family and its default grid (got the {family.name} family"
                + (" and --student_timesteps)." if config.student_timesteps else ").")
            )
        return family.released_bf16_grid(config.num_student_steps, config.shift), {"time_dtype": "bfloat16"}
    if config.student_timesteps:
        return [float(timestep) for timestep in config.student_timesteps], {}
    return family.student_grid(
        config.num_student_steps, config.shift, dict(scheduler_config), config.resolution, vae_scale_factor
    )


def read_scheduler_config(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """The teacher's `scheduler/scheduler_config.json` (local folder or Hub), without loading anything else."""
    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        config_file = path / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} has no scheduler/scheduler_config.json: the student grid follows the "
                "teacher's scheduler. Give a complete pipeline folder, or the grid itself with --student_timesteps."
            )
        return json.loads(config_file.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(
        pretrained_model_name_or_path,
        "scheduler_config.json",
        subfolder="scheduler",
        revision=revision,
        **hub_cache_kwargs(),
    )
    return json.loads(Path(file).read_text(encoding="utf-8"))


def read_component_config(pretrained_model_name_or_path: str, subfolder: str, revision: str | None = None) -> dict:
    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        config_file = path / subfolder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{pretrained_model_name_or_path} has no {subfolder}/config.json.")
        return json.loads(config_file.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(
        pretrained_model_name_or_path, "config.json", subfolder=subfolder, revision=revision, **hub_cache_kwargs()
    )
    return json.loads(Path(file).read_text(encoding="utf-8"))


def read_vae_config(name_or_path: str, revision: str | None = None) -> dict:
    """The `config.json` at the root of a VAE folder or Hub repo (`--pretrained_vae_model_name_or_path`), no weights.

    Raises `FileNotFoundError` naming the fix: a missing folder, a pipeline folder given instead of its `vae/`, a Hub
    id that cannot be read (offline and not cached, wrong id or revision).
    """
    flag = "--pretrained_vae_model_name_or_path"
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not path.is_dir():
            raise FileNotFoundError(f"{flag} {name_or_path} does not exist; give a VAE folder or a Hub id.")
        if not (path / "config.json").is_file():
            hint = (
                f" (it is a pipeline folder: give {path / 'vae'})" if (path / "vae" / "config.json").is_file() else ""
            )
            raise FileNotFoundError(f"{flag} {name_or_path} has no config.json: it is not a VAE folder{hint}.")
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(name_or_path, "config.json", revision=revision, **hub_cache_kwargs())
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise FileNotFoundError(
            f"Could not read config.json of {flag} {name_or_path!r} (revision {revision or 'main'}, which --revision "
            f"sets for the VAE too; {type(error).__name__}: {reason}). Check the id and your network (HF_HUB_OFFLINE, "
            "--cache_dir), or give a local VAE folder."
        ) from None
    return json.loads(Path(file).read_text(encoding="utf-8"))


def load_vae(
    name_or_path: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load `--pretrained_vae_model_name_or_path` as the class its `config.json` names, which must be a diffusers
    model class (the preflight also checked it is the teacher VAE's class); safetensors weights only."""
    import diffusers

    class_name = read_vae_config(name_or_path, revision).get("_class_name")
    vae_class = getattr(diffusers, str(class_name), None)
    if not (isinstance(vae_class, type) and issubclass(vae_class, diffusers.ModelMixin)):
        raise ValueError(
            f"--pretrained_vae_model_name_or_path {name_or_path}: its config names {class_name!r}, which is not a "
            "diffusers model class."
        )
    return vae_class.from_pretrained(
        name_or_path, revision=revision, variant=variant, dtype=dtype, use_safetensors=True, **hub_cache_kwargs()
    )


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
    # Side of the latent patches the trainer's latents are cut into inside `call_backbone` (the resolution must be a
    # multiple of the VAE factor times it, as the stock pipeline requires); 1 where the backbone takes any size.
    latent_patch_size: int = 1
    # The real score's unconditional branch: the negative prompt the stock pipeline's CFG uses by default.
    negative_prompt: str = ""
    # -- facts read by the config, preflight, the model card, the LoRA formats and the export -----------------------
    # Model card tags besides the common ones.
    card_tags: tuple[str, ...] = ()
    # Key form of the ComfyUI / kohya LoRA file (`lora_formats.UNET_STYLE` or `TRANSFORMER_STYLE`); None: not written.
    comfy_lora_style: str | None = None
    # Prompt tokens the trainer encodes with (and the export passes as `max_sequence_length`); None: the stock default.
    max_prompt_tokens: int | None = None
    # The guidance embedding a guidance-distilled teacher samples at by default (FLUX.1 [dev]); None: no embedding.
    default_guidance_embedding: float | None = None
    # How the default student grid is made: one of `GRID_RULES`.
    grid_rule: str = "shifted-flow"
    # Non-square training (`--width`): wired through the UNet families' size conditioning, and Wan (static grid, no
    # packing: its stock pipeline samples 480 x 832).
    supports_non_square: bool = False
    # Video families (Wan): 5-D `(B, C, F, H, W)` latents from `--num_frames`, decoded to `(B, 3, F, H, W)` videos.
    is_video: bool = False

    @property
    def stock_route(self) -> StockRoute:
        """How `FewStepDMDRPipeline` drives this family's stock pipeline: read from `pipelines/pipeline_dmdr.py`,
        which states it again because it ships standalone in exports (a test checks the two agree)."""
        return STOCK_ROUTES[self.pipeline_class_name]

    @property
    def grid_uses_teacher_scheduler(self) -> bool:
        """The default grid is computed by the teacher's own scheduler (`student_grid` reads its config)."""
        return self.grid_rule == "teacher-scheduler"

    @property
    def backbone_class_name(self) -> str:
        """The diffusers class of the teacher's backbone (`UNet2DConditionModel`, `SD3Transformer2DModel`, ...)."""
        return self.stock_route.backbone_class

    # -- configuration, before weights -----------------------------------------------------------------------------
    def vae_scale_factor(self, source: str, revision: str | None = None) -> int:
        vae_config = read_component_config(source, "vae", revision)
        return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @abstractmethod
    def default_student_timesteps(self, num_steps: int, shift: float | None) -> list[float]:
        """The student grid in model units, noisiest first."""

    def check_teacher(self, model_index: dict, source: str, revision: str | None = None) -> None:
        """Refuse, before any weight loads, a teacher of this pipeline class that the family cannot distil (e.g. an
        already step-distilled variant); the message names the checkpoint to use instead. Default: accept."""
        return None

    def check_run_config(self, config) -> None:
        """Refuse, before any weight loads, run settings this family cannot train (`config`: a `DMDRConfig`).
        Default: `--num_frames` and `--reward_frames` belong to the video families."""
        for flag in ("num_frames", "reward_frames"):
            if getattr(config, flag, None) is not None:
                raise ValueError(
                    f"--{flag} {getattr(config, flag)} applies to video teachers (wan); this teacher is a {self.name} "
                    f"image pipeline: drop --{flag}."
                )

    def student_grid(
        self, num_steps: int, shift: float | None, scheduler_config: dict, resolution: int, vae_scale_factor: int
    ) -> tuple[list[float], dict]:
        """`(timesteps, grid_origin)`: the default grid for this teacher scheduler at `resolution`, and the config keys
        recording how it was derived. Families whose grid does not depend on them return
        `default_student_timesteps(num_steps, shift)` and no origin."""
        return self.default_student_timesteps(num_steps, shift), {}

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
        vae: str | None = None,
    ) -> TeacherComponents:
        """Load the teacher pipeline on the CPU directly in `dtype` (the training dtype: no float32 copy is made);
        the trainer places it. `vae` (`--pretrained_vae_model_name_or_path`) replaces the teacher's VAE, loaded at
        the same `revision` and `variant`, as diffusers' SDXL training scripts do."""
        components = {} if vae is None else {"vae": load_vae(vae, revision, variant, dtype)}
        pipeline = self.pipeline_class().from_pretrained(
            source, revision=revision, variant=variant, dtype=dtype, **components, **hub_cache_kwargs()
        )
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
            source, subfolder=self.backbone_name, revision=revision, variant=variant, dtype=dtype, **hub_cache_kwargs()
        )

    def load_run_teacher(self, config, dtype: torch.dtype = torch.float32) -> TeacherComponents:
        """The teacher of the run `config` (a `DMDRConfig`): its folder or Hub id, revision and variant, its
        `--pretrained_vae_model_name_or_path`, read through its `--cache_dir`. Training and the export both load it
        here, so the exported pipeline ships the VAE the samples were decoded with."""
        from ..hub_cache import using_hub_cache_dir

        # `vae` only when set: a family that overrides `load_teacher` without it still loads its own teacher.
        vae = {"vae": config.pretrained_vae_model_name_or_path} if config.pretrained_vae_model_name_or_path else {}
        with using_hub_cache_dir(config.cache_dir):
            return self.load_teacher(
                config.pretrained_model_name_or_path, config.revision, config.variant, dtype, **vae
            )

    def text_encoders(self, pipeline) -> list[torch.nn.Module]:
        return [getattr(pipeline, name) for name in TEXT_ENCODER_NAMES if getattr(pipeline, name, None) is not None]

    # -- per-step work -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, pipeline, prompts: list[str], resolution: int, device: torch.device) -> dict:
        """Conditioning kwargs of the backbone for `prompts` (no grad; text encoders are frozen)."""

    @abstractmethod
    def call_backbone(self, backbone, sample: torch.Tensor, timestep: torch.Tensor, condition: dict) -> torch.Tensor:
        """The backbone's raw prediction (eps, v or flow velocity) for `sample` at model `timestep`."""

    def latent_channels(self, backbone) -> int:
        return backbone.config.in_channels

    def latent_shape(
        self, backbone, vae_scale_factor: int, height: int, width: int | None = None
    ) -> tuple[int, int, int]:
        """`(C, H, W)` of the latent the trainer keeps and noises (packing, if any, happens in `call_backbone`) for an
        image of `height` x `width` pixels (square when `width` is not given)."""
        width = height if width is None else width
        return (self.latent_channels(backbone), height // vae_scale_factor, width // vae_scale_factor)

    def spatial_vae_factor(self, pipeline) -> int:
        """The loaded pipeline's spatial VAE factor (`vae_scale_factor`; Wan names it `vae_scale_factor_spatial`)."""
        return pipeline.vae_scale_factor

    def run_latent_shape(self, backbone, pipeline, config) -> tuple[int, ...]:
        """The shape (without batch) of the latents the trainer noises for the run `config`: [`latent_shape`] at its
        image size; video families add the frame axis."""
        return self.latent_shape(backbone, self.spatial_vae_factor(pipeline), *config.image_size)

    def export_init_kwargs(self, pipeline) -> dict:
        """Constructor arguments of the stock pipeline that depend on the teacher checkpoint (stored in the export's
        `FewStepDMDRPipeline` config, over the stock route's `init_kwargs`). Default: none."""
        return {}

    def step_noise(self, sample: torch.Tensor, generator) -> torch.Tensor:
        """Fresh re-noising noise for the student's sampler, drawn in the layout of the latents the stock pipeline
        hands `scheduler.step`, so the exported pipeline reproduces the sampler for the same generator. Default: the
        trainer's own `(B, C, H, W)` layout."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    def export_call_defaults(self, config, pipeline) -> dict:
        """Stock-pipeline call arguments the student was trained with that depend on the run (stored in the export's
        `FewStepDMDRPipeline` config, over the stock route's own defaults). Default: none."""
        return {}

    def with_guidance_embedding(self, condition: dict, guidance_scale: float) -> dict:
        """`condition` at a guidance embedding of `guidance_scale` (guidance-distilled backbones such as FLUX.1
        [dev]); families without one return it unchanged."""
        return condition

    def real_score_x0(
        self, denoiser, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict, uncondition: dict, scale
    ) -> torch.Tensor:
        """The real score's `x0` at guidance `scale`: two-pass classifier-free guidance against `uncondition` (the
        family's negative prompt, as its stock pipeline's CFG uses by default); families whose stock CFG differs
        override it."""
        return guided_x0(denoiser, sample, noise_level, condition, uncondition, scale)

    def config_latent_channels(self, backbone_config: dict, vae_config: dict) -> tuple[int | None, int]:
        """`(latent channels the backbone takes, latent channels the VAE makes)` from their configs alone."""
        return backbone_config.get("in_channels"), vae_config.get("latent_channels", 4)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in `[0, 1]`, differentiable (the reward path back-propagates through it)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def lora_save_kwargs(self, lora_state_dict: dict) -> dict:
        """Keyword arguments of the pipeline's `save_lora_weights` for a backbone LoRA state dict."""
        return {f"{self.backbone_name}_lora_layers": lora_state_dict}
