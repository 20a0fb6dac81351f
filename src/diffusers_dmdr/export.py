"""Export a trained DMDR student as a Hub-ready folder: assemble the student pipeline and write the folder.

The export folder (the run's `output_dir` at the end of training; any folder from the `export` entry point) holds:

```
README.md                          model card: metadata, samples, loading snippets, sampler, recipe
samples.png                        the validation prompts sampled by the student (when there are any; video
                                   students: samples.gif, an animated grid of the clips)
pytorch_lora_weights.safetensors   the student LoRA in diffusers format (LoRA mode)
pytorch_lora_weights_kohya.safetensors
                                   the same LoRA in ComfyUI / Forge / Automatic1111 keys (LoRA mode)
pipeline_dmdr.py                   FewStepDMDRPipeline, copied verbatim from the package
scheduler/                         DMDRScheduler config (the trained timesteps) + scheduling_dmdr.py
model_index.json, unet/ or transformer/, vae/, text_encoder*/, tokenizer*/
                                   the full student pipeline (full mode, or LoRA mode with export_full_pipeline)
```

Checkpoints and logs may sit in the same folder; they are never uploaded. The card is built in `model_card.py`, the
push is `hub.push_to_hub`, and the command line (`dmdr-export`, `python -m diffusers_dmdr.export_cli`) is
`export_cli.py`.
"""

import copy
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

from .adapters import (
    FAKE_ADAPTER,
    STUDENT_ADAPTER,
    add_lora_adapter,
    load_adapter_state_dict,
    parse_target_modules,
)
from .checkpointing import (
    CONFIG_FILE,
    STUDENT_FULL_FILE,
    STUDENT_LORA_FILE,
    incomplete_reason,
    list_checkpoints,
    load_weights_file,
    resolve_checkpoint,
)
from .config import DMDRConfig, hub_model_id_problems
from .export_layout import (  # noqa: F401  (the file names are part of this module's API)
    LOCAL_PATHS_FILE,
    LORA_WEIGHT_NAME,
    PIPELINE_CLASS,
    PIPELINE_MODULE,
    SAMPLES_FILE,
    SAMPLES_VIDEO_FILE,
    SCHEDULER_CLASS,
    SCHEDULER_MODULE,
    SUMMARY_FILE,
)
from .families import ModelFamily, detect_family, get_family, read_teacher_config
from .families.base import TeacherComponents, run_student_scheduler
from .hub import UPLOAD_IGNORE_PATTERNS, HubUploadError, hub_id_of, push_to_hub  # noqa: F401  (this module's API)
from .hub_cache import using_hub_cache_dir
from .lora_formats import KOHYA_LORA_WEIGHT_NAME, UNET_STYLE, WAN_STYLE, peft_to_comfy_lora
from .method.denoisers import Denoiser
from .method.simulation import sample_student
from .model_card import BASE_MODEL_PLACEHOLDER, ModelCardInfo, make_model_card
from .pipelines import pipeline_dmdr, scheduling_dmdr
from .pipelines.pipeline_dmdr import FewStepDMDRPipeline
from .pipelines.scheduling_dmdr import DMDRScheduler
from .preflight import check_output_dir
from .utils import redact_local_paths, redact_local_paths_in, resolve_dtype, save_image_grid
from .video_io import save_video_grid


logger = logging.getLogger(__name__)


@dataclass
class StudentWeights:
    """The trained student: a PEFT-format LoRA state dict and its `LoraConfig` (LoRA mode), or a full state dict."""

    lora_state_dict: dict[str, torch.Tensor] | None = None
    lora_config: dict | None = None
    full_state_dict: dict[str, torch.Tensor] | None = None

    @property
    def is_lora(self) -> bool:
        return self.lora_state_dict is not None


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------
def export_from_trainer(trainer) -> Path | None:
    """Export the trainer's student into `trainer.config.output_dir` and push it when `config.push_to_hub`.

    Reuses the trainer's components (text encoders, tokenizers, VAE, the frozen base): the teacher is not loaded a
    second time. The sample grid comes from the trainer's own sampler ([`DMDRTrainer.sample_latents`]) with the
    validation prompts and seed. Call it on every process: under FSDP the student's weights are gathered
    collectively and every process takes part in sampling; the main process writes the folder.

    Args:
        trainer ([`DMDRTrainer`]): a trained (or partly trained) trainer.

    Returns:
        `Path`: the export folder (`None` on the other processes).
    """
    config, is_main = trainer.config, trainer.accelerator.is_main_process
    student_state = trainer.student_state_dict()
    sample_images = None
    prompts = _sample_prompts(config)
    if prompts and (is_main or trainer.sharded):
        generator = torch.Generator("cpu").manual_seed(config.seed)
        sample_images = trainer.decode(trainer.sample_latents(prompts, generator=generator)).float().cpu()
    if not is_main:
        return None
    if config.training_mode == "lora":
        lora_config = trainer.guidance_model.peft_config[STUDENT_ADAPTER].to_dict()
        weights = StudentWeights(lora_state_dict=student_state, lora_config=lora_config)
    else:
        weights = StudentWeights(full_state_dict=student_state)
    metrics = {key: value for key, value in (trainer.history[-1] if trainer.history else {}).items() if key != "step"}
    return assemble_export(
        config.output_dir,
        config,
        trainer.family,
        trainer.scheduler,
        weights,
        trainer.pipeline,
        lambda: _student_backbone_from_trainer(trainer, weights),
        sample_images=sample_images,
        metrics=metrics,
        hub_model_id=config.hub_model_id,
        push=config.push_to_hub,
        hub_private=config.hub_private,
        hub_timeout=config.hub_timeout,
        checkpoint=config.output_dir,
        trained_steps=trainer.state.global_step,
    )


def _student_backbone_from_trainer(trainer, weights: StudentWeights) -> torch.nn.Module:
    """A standalone float32 student backbone on the CPU, built from what the trainer holds.

    Unsharded runs copy the trainer's own modules (the base, or the full student) and drop the fake adapter. Sharded
    runs hold only shards of the base, so its backbone alone is read again (never the whole teacher pipeline) and
    the gathered student weights are applied to it.
    """
    module = trainer.training_module
    if trainer.sharded:
        config = trainer.config
        with using_hub_cache_dir(config.cache_dir):
            backbone = trainer.family.load_backbone(
                config.pretrained_model_name_or_path, config.revision, config.variant
            )
        return _apply_student_weights(backbone, trainer.family, config, weights)
    if module.is_full:
        return copy.deepcopy(module.student_backbone).to("cpu", torch.float32).eval()
    # Fused in float32 so that the saved weights lose nothing to the adapter arithmetic.
    backbone = copy.deepcopy(module.backbone).to("cpu", torch.float32)
    backbone.delete_adapters(FAKE_ADAPTER)
    backbone.set_adapter(STUDENT_ADAPTER)
    return backbone.eval()


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    push: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool | None = None,
    export_full_pipeline: bool | None = None,
    base_model: str | None = None,
    device: str | torch.device | None = None,
    hub_timeout: float | None = None,
) -> Path:
    """Rebuild the export of a saved checkpoint: reload the teacher, apply the student weights, write the folder.

    Args:
        checkpoint (`str` or `Path`):
            A `checkpoint-N` folder, or a run's `output_dir` (its latest checkpoint is used).
        output_dir (`str` or `Path`):
            The export folder (may be the run's `output_dir` itself).
        push (`bool`, defaults to `False`):
            Upload the folder to the Hub afterwards.
        hub_model_id (`str`, *optional*):
            The repo id; defaults to the run's `hub_model_id`.
        hub_private (`bool`, *optional*):
            Create the repo as private; defaults to the run's `hub_private`.
        export_full_pipeline (`bool`, *optional*):
            Also save the fused full pipeline in LoRA mode; defaults to the run's setting.
        base_model (`str`, *optional*):
            The teacher's Hub id for the card, when the run loaded it from a local folder.
        device (`str` or `torch.device`, *optional*):
            Where to sample the grid; defaults to CUDA when available.
        hub_timeout (`float`, *optional*):
            Seconds each Hub request of the push may take; defaults to the run's `hub_timeout`.

    Returns:
        `Path`: the export folder.
    """
    # Every check before the teacher loads: the checkpoint is complete, the output folder usable, the Hub id valid.
    checkpoint_dir = _resolve_checkpoint_dir(Path(checkpoint))
    check_output_dir(str(output_dir))
    recover_interrupted_export(Path(output_dir))
    # The export builds no reward, so the import paths of the run's rewards are never imported here.
    config = DMDRConfig.from_yaml(checkpoint_dir / CONFIG_FILE, allow_reward_import_paths=True)
    if export_full_pipeline is not None:
        config.export_full_pipeline = export_full_pipeline
    if base_model is not None:
        config.base_model = base_model
    hub_model_id = hub_model_id or config.hub_model_id
    hub_timeout = config.hub_timeout if hub_timeout is None else hub_timeout
    if push and not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id org/name (the run's config has none).")
    if push:
        problems = hub_model_id_problems(hub_model_id)
        if problems:
            raise ValueError(problems[0])
    family = _family_of(config)
    weights = _checkpoint_student_weights(checkpoint_dir, config)
    teacher = family.load_run_teacher(config)
    scheduler = run_student_scheduler(teacher, config)
    backbone = _apply_student_weights(teacher.backbone, family, config, weights)
    if weights.is_lora:
        weights.lora_config = backbone.peft_config[STUDENT_ADAPTER].to_dict()
    sample_images = None
    prompts = _sample_prompts(config)
    if prompts:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher.pipeline.to(device)
        generator = torch.Generator("cpu").manual_seed(config.seed)
        latents = sample_student_latents(teacher, scheduler, config, prompts, generator)
        sample_images = family.decode(teacher.vae, latents).float().cpu()
        teacher.pipeline.to("cpu")
    # The run's summary holds the last logs; they describe this checkpoint only if it is the final one.
    summary_file = checkpoint_dir.parent / SUMMARY_FILE
    metrics = {}
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if summary.get("global_step") == int(checkpoint_dir.name.split("-")[1]) and summary.get("history"):
            metrics = {key: value for key, value in summary["history"][-1].items() if key != "step"}
    return assemble_export(
        output_dir,
        config,
        family,
        scheduler,
        weights,
        teacher.pipeline,
        lambda: backbone,
        sample_images=sample_images,
        metrics=metrics,
        hub_model_id=hub_model_id,
        checkpoint_name=checkpoint_dir.name,
        trained_steps=int(checkpoint_dir.name.split("-")[1]),
        push=push,
        hub_private=config.hub_private if hub_private is None else hub_private,
        hub_timeout=hub_timeout,
        checkpoint=checkpoint_dir,
    )


def student_pipeline_from_checkpoint(checkpoint: str | Path) -> FewStepDMDRPipeline:
    """The student of a saved checkpoint as a [`FewStepDMDRPipeline`] in memory, nothing written: the teacher
    reloaded with the student's weights fused in, the run's sampler, in the run's precision (what `dmdr-export`
    would save as the full pipeline). `python -m diffusers_dmdr.evaluate --pipeline run/checkpoint-N` samples it.

    Args:
        checkpoint (`str` or `Path`): a complete `checkpoint-N` folder, or a run's `output_dir` (its latest one).
    """
    checkpoint_dir = _resolve_checkpoint_dir(Path(checkpoint))
    config = DMDRConfig.from_yaml(checkpoint_dir / CONFIG_FILE, allow_reward_import_paths=True)
    family = _family_of(config)
    weights = _checkpoint_student_weights(checkpoint_dir, config)
    teacher = family.load_run_teacher(config)
    scheduler = run_student_scheduler(teacher, config)
    backbone = _apply_student_weights(teacher.backbone, family, config, weights)
    if weights.is_lora:
        weights.lora_config = backbone.peft_config[STUDENT_ADAPTER].to_dict()
    return _full_student_pipeline(teacher.pipeline, family, scheduler, backbone, config, weights)


def _checkpoint_student_weights(checkpoint_dir: Path, config: DMDRConfig) -> StudentWeights:
    if config.training_mode == "lora":
        return StudentWeights(lora_state_dict=load_weights_file(checkpoint_dir / STUDENT_LORA_FILE))
    return StudentWeights(full_state_dict=load_weights_file(checkpoint_dir / STUDENT_FULL_FILE))


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is a training checkpoint folder (`checkpoint-N` holding the run's config)."""
    path = Path(path).expanduser()
    return path.name.startswith("checkpoint-") and (path / CONFIG_FILE).is_file()


def assemble_export(
    output_dir: str | Path,
    config: DMDRConfig,
    family: ModelFamily,
    scheduler: DMDRScheduler,
    weights: StudentWeights,
    stock_pipeline,
    student_backbone: Callable[[], torch.nn.Module],
    sample_images: torch.Tensor | None,
    metrics: dict,
    hub_model_id: str | None,
    push: bool,
    hub_private: bool,
    hub_timeout: float,
    checkpoint: str | Path,
    checkpoint_name: str | None = None,
    trained_steps: int | None = None,
) -> Path:
    """The one assemble step of both exports (end of training and `dmdr-export`): the fused full pipeline when the
    run asks for one (`student_backbone()` is built only then), the folder ([`write_export`]), and the push."""
    full_pipeline = None
    if config.training_mode == "full" or config.export_full_pipeline:
        full_pipeline = _full_student_pipeline(stock_pipeline, family, scheduler, student_backbone(), config, weights)
    output_dir = write_export(
        output_dir,
        config,
        family,
        scheduler,
        weights,
        full_pipeline=full_pipeline,
        sample_images=sample_images,
        metrics=metrics,
        hub_model_id=hub_model_id,
        base_model=config.base_model,
        checkpoint_name=checkpoint_name,
        hub_timeout=hub_timeout if push else None,
        trained_steps=trained_steps,
    )
    if push:
        push_to_hub(output_dir, hub_model_id, private=hub_private, checkpoint=checkpoint, timeout=hub_timeout)
    return output_dir


@torch.no_grad()
def sample_student_latents(
    teacher: TeacherComponents, scheduler: DMDRScheduler, config: DMDRConfig, prompts: list[str], generator
) -> torch.Tensor:
    """The trainer's N-step sampler ([`~simulation.sample_student`], as [`DMDRTrainer.sample_latents`] runs it) on a
    loaded teacher whose backbone carries the student: prompts encoded as the trainer encodes them, the initial noise
    and the re-noising draws taken from `generator` in the trainer's layout."""
    family, device = teacher.family, teacher.backbone.device
    # The conditioning size the trainer encodes with (SDXL's micro-conditioning holds height and width).
    condition = family.encode_prompts(teacher.pipeline, prompts, config.conditioning_size, device)
    condition = family.with_guidance_embedding(condition, config.guidance_embedding_scale)
    shape = family.run_latent_shape(teacher.backbone, teacher.pipeline, config)
    noise = randn_tensor((len(prompts), *shape), generator=generator, device=device, dtype=torch.float32)
    student = Denoiser(partial(family.call_backbone, teacher.backbone), scheduler)
    predictions = sample_student(
        lambda sample, level: student(sample, level, condition),
        noise,
        scheduler,
        deterministic=scheduler.config.deterministic,
        generator=generator,
        noise_fn=family.step_noise,
    )
    return predictions[-1].float()


def export_pipeline(pipeline: FewStepDMDRPipeline, output_dir: str | Path) -> Path:
    """Save a (possibly reloaded) [`FewStepDMDRPipeline`] so that every loading route works on the folder: its own
    `save_pretrained` writes the repository-code form (`model_index.json` naming `pipeline_dmdr.py` and
    `scheduler/scheduling_dmdr.py`, both copied in)."""
    if type(pipeline.scheduler).__name__ != SCHEDULER_CLASS:
        raise ValueError(f"export_pipeline needs a {SCHEDULER_CLASS}, got {type(pipeline.scheduler).__name__}.")
    output_dir = Path(output_dir)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Building the student pipeline
# ----------------------------------------------------------------------------------------------------------------
def _apply_student_weights(backbone, family: ModelFamily, config: DMDRConfig, weights: StudentWeights):
    if weights.is_lora:
        targets = parse_target_modules(config.lora_target_modules, family.student_lora_targets)
        add_lora_adapter(
            backbone, STUDENT_ADAPTER, config.lora_rank, config.lora_alpha, targets, dropout=config.lora_dropout
        )
        load_adapter_state_dict(backbone, STUDENT_ADAPTER, weights.lora_state_dict)
    else:
        backbone.load_state_dict(weights.full_state_dict, strict=True)
    return backbone.eval()


def _full_student_pipeline(stock_pipeline, family, scheduler, backbone, config, weights) -> FewStepDMDRPipeline:
    """The student's `FewStepDMDRPipeline` from the teacher's components, its LoRA fused, in the run's precision."""
    expected_components, _ = FewStepDMDRPipeline._get_signature_keys(FewStepDMDRPipeline)
    components = {name: module for name, module in stock_pipeline.components.items() if name in expected_components}
    components.update({"scheduler": scheduler, family.backbone_name: backbone})
    # Run-dependent call defaults travel with the export: the trained size (the stock default may be one the
    # student never saw, or one a tiny backbone's position table cannot reach), FLUX.1's trained guidance embedding,
    # the prompt length.
    height, width = config.image_size
    call_defaults = {"height": height, "width": width, **family.export_call_defaults(config, stock_pipeline)}
    # Checkpoint-dependent constructor flags of the stock pipeline (Wan 2.2 TI2V-5B's `expand_timesteps`).
    init_kwargs = family.export_init_kwargs(stock_pipeline)
    pipeline = FewStepDMDRPipeline(**components, call_defaults=call_defaults, stock_init_kwargs=init_kwargs or None)
    if weights.is_lora:
        # Fused in float32 before any cast, so the saved weights lose nothing to the adapter arithmetic.
        pipeline.backbone.fuse_lora(adapter_names=[STUDENT_ADAPTER])
        pipeline.backbone.unload_lora()
    dtype = resolve_dtype(config.mixed_precision or "no")
    # The teacher is loaded in float32: cast only when the run used another precision.
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def _family_of(config: DMDRConfig) -> ModelFamily:
    if config.family != "auto":
        return get_family(config.family)
    with using_hub_cache_dir(config.cache_dir):
        model_index = read_teacher_config(config.pretrained_model_name_or_path, config.revision)
    return get_family(detect_family(model_index, config.pretrained_model_name_or_path))


def _resolve_checkpoint_dir(path: Path) -> Path:
    """`path` itself when it is a checkpoint folder, else the newest complete checkpoint of a run's folder; either
    way a complete one (its completeness marker matches its files), as training would resume it."""
    if path.name.startswith("checkpoint-") and path.is_dir():
        reason = incomplete_reason(path)
        if reason is not None:
            raise ValueError(
                f"--checkpoint {path} is not a complete checkpoint: {reason}. Export an earlier checkpoint, or pass "
                "the run's folder to export its newest complete one."
            )
        return path
    if list_checkpoints(path):
        latest = resolve_checkpoint(path, "latest")
        if latest is None:
            raise ValueError(
                f"--checkpoint {path} holds no complete checkpoint-N folder (every save was interrupted)."
            )
        return latest
    raise FileNotFoundError(
        f"--checkpoint {path} is neither a checkpoint folder (checkpoint-N with {CONFIG_FILE}) nor a run's "
        "output_dir holding checkpoint-N folders."
    )


def _sample_prompts(config: DMDRConfig) -> list[str]:
    return [prompt for prompt in config.validation_prompts or [] for _ in range(config.num_validation_images)]


# ----------------------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------------------
def write_export(
    output_dir: str | Path,
    config: DMDRConfig,
    family: ModelFamily,
    scheduler: DMDRScheduler,
    weights: StudentWeights,
    full_pipeline: FewStepDMDRPipeline | None = None,
    sample_images: torch.Tensor | None = None,
    metrics: dict | None = None,
    hub_model_id: str | None = None,
    base_model: str | None = None,
    checkpoint_name: str | None = None,
    hub_timeout: float | None = None,
    trained_steps: int | None = None,
) -> Path:
    """Write the export folder (see the module docstring) and return it. No Hub request is sent unless
    `hub_timeout` is given (an export about to be pushed may then read the teacher's card within that time).

    The export is written to a staging folder beside `output_dir` first and moved in only once complete
    ([`replace_export`]): a failed export leaves the previous one as it was, and a re-export leaves none of the
    previous export's files behind (a stale `samples.png`, the pipeline folders of an earlier full export).

    Args:
        output_dir: the folder; a previous export in it is replaced, other files (checkpoints, logs) are left alone.
        config: the run's configuration (the recipe in the card).
        family: the model family.
        scheduler: the student's [`DMDRScheduler`].
        weights: the student weights; in LoRA mode `lora_config` must be set.
        full_pipeline: the fused full pipeline to save, if any.
        sample_images: `(B, 3, H, W)` samples in `[0, 1]` of the validation prompts, in prompt order.
        metrics: the last training logs (rewards, losses) for the card.
        hub_model_id: the Hub repo id used in the card's snippets.
        base_model: the teacher's Hub id, when the run loaded it from a local folder.
        checkpoint_name: the checkpoint exported, for the card.
        hub_timeout: seconds a Hub request may take; `None` sends none.
        trained_steps: the generator updates behind the student, when fewer than `config.max_train_steps`.
    """
    output_dir = Path(output_dir)
    recover_interrupted_export(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(output_dir)
    try:
        comfy_lora = None
        if weights.is_lora:
            save_student_lora(staging, family, weights)
            comfy_lora = save_comfy_lora(staging, family, weights)
        if full_pipeline is not None:
            export_pipeline(full_pipeline, staging)
        else:
            scheduler.save_pretrained(staging / "scheduler")
            _copy_code(staging)
        if sample_images is not None and sample_images.ndim == 5:
            # Video students: the clips as an animated GIF grid (`video_io.py`).
            save_video_grid(sample_images, staging / SAMPLES_VIDEO_FILE, rows=len(config.validation_prompts))
        elif sample_images is not None:
            prompts = config.validation_prompts
            save_image_grid(sample_images, staging / SAMPLES_FILE, rows=len(prompts), row_captions=prompts)
        backbone = getattr(full_pipeline, family.backbone_name, None) if full_pipeline is not None else None
        info = ModelCardInfo(
            config,
            family,
            scheduler,
            repo_id=hub_model_id or output_dir.name,
            base_model=base_model,
            has_lora=weights.is_lora,
            has_comfy_lora=comfy_lora is not None,
            has_full_pipeline=full_pipeline is not None,
            has_samples=sample_images is not None,
            metrics=metrics or {},
            checkpoint_name=checkpoint_name,
            backbone_class_name=type(backbone).__name__ if backbone is not None else None,
            trained_steps=trained_steps,
        )
        if info.teacher_hub_id is None:
            logger.warning(
                f"The teacher {config.pretrained_model_name_or_path} is a local folder and no --base_model names its "
                f"Hub id: the card has no base_model and its snippets load the placeholder {BASE_MODEL_PLACEHOLDER!r}. "
                "Re-export with --base_model org/name to fill them."
            )
        with using_hub_cache_dir(config.cache_dir):  # the teacher's card (its licence) is read from the cache
            card = make_model_card(info, existing_card=output_dir / "README.md", hub_timeout=hub_timeout)
        # What is published names no local folder: absolute paths become `<local>/<name>` in the recipe, and in the
        # card of an export about to be pushed (a local card keeps them; the run's checkpoints keep their own,
        # unredacted dmdr_config.yaml).
        card_text = str(card) if hub_timeout is None else redact_local_paths(str(card))
        (staging / "README.md").write_text(card_text, encoding="utf-8")
        public_config = redact_local_paths_in(
            {k: v for k, v in config.to_dict().items() if k != "allow_reward_import_paths"}
        )
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(public_config, sort_keys=False), encoding="utf-8")
        write_local_paths(staging, config)
        replace_export(output_dir, staging)
    finally:
        # A swap under way (its journal still there: the process is being stopped mid-move) is left for the next
        # export to finish; anything else in the staging folder is a failed or a finished export's leftovers.
        if not (staging / SWAP_JOURNAL).exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Exported the DMDR student to {output_dir}")
    return output_dir


def write_local_paths(folder: Path, config) -> None:
    """Record a local teacher's absolute folder in `LOCAL_PATHS_FILE` (the published recipe redacts it), so that
    `evaluate --teacher auto` finds the teacher from any working folder; nothing is written for a Hub teacher."""
    teacher = Path(config.pretrained_model_name_or_path).expanduser()
    if teacher.is_dir():
        payload = {"pretrained_model_name_or_path": str(teacher.resolve()), "revision": config.revision}
        (folder / LOCAL_PATHS_FILE).write_text(json.dumps(payload, indent=1), encoding="utf-8")


def export_entries(folder: Path) -> set[str]:
    """The top-level names in `folder` that belong to an export: its fixed files, and the component folders its
    `model_index.json` names. Checkpoints, logs, validation grids and the run's summary are never among them."""
    names = {
        "README.md",
        SAMPLES_FILE,
        SAMPLES_VIDEO_FILE,
        CONFIG_FILE,
        LOCAL_PATHS_FILE,
        LORA_WEIGHT_NAME,
        KOHYA_LORA_WEIGHT_NAME,
        f"{PIPELINE_MODULE}.py",
        "scheduler",
        "model_index.json",
    }
    index_file = folder / "model_index.json"
    if index_file.is_file():
        try:
            model_index = json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError as error:
            # Its component folders cannot be told apart from the run's own files: replacing would leave them stale.
            raise ValueError(
                f"{index_file} is not valid JSON ({error}): the export cannot tell which folders belong to the "
                "previous export. Fix or delete that file (and the pipeline folders it named), then export again."
            ) from error
        names |= {name for name, value in model_index.items() if not name.startswith("_") and isinstance(value, list)}
    protected = {name for name in names if name.startswith(("checkpoint-", ".checkpoint-")) or name in ("logs",)}
    return {name for name in names - protected if (folder / name).exists()}


# Inside a staging folder: the swap's plan (written once the export is complete, before anything moves) and the
# folder the previous export's entries are moved into.
SWAP_JOURNAL = ".export_swap.json"
PREVIOUS_EXPORT = ".previous"


def staging_dir_for(output_dir: Path) -> Path:
    """A new, empty staging folder beside `output_dir` (the same filesystem, so every move is a rename)."""
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.export-", dir=output_dir.parent))


def recover_interrupted_export(output_dir: str | Path) -> None:
    """Clean up after an export of `output_dir` that was killed, before a new one starts.

    A staging folder with a swap journal was killed while its export was moving in: the swap is finished (the
    previous export's entries moved aside, every new entry moved in), so the folder holds the new export. A staging
    folder without one was killed while being written: it is deleted, and the folder still holds the previous
    export. Either way no staging folder is left. (The folder a former version moved the previous export into is
    emptied back into `output_dir` for the entries it lacks.)
    """
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        return
    name = glob.escape(output_dir.name)
    for staging in sorted(output_dir.parent.glob(f".{name}.export-*")):
        journal = staging / SWAP_JOURNAL
        if journal.is_file():
            plan = json.loads(journal.read_text(encoding="utf-8"))
            output_dir.mkdir(parents=True, exist_ok=True)
            _swap_in(output_dir, staging, plan["previous"], plan["new"])
            logger.warning(f"Finished the export into {output_dir} that was interrupted while moving in ({staging}).")
        else:
            logger.warning(f"Removing {staging}: the staging folder of an export that was interrupted.")
        shutil.rmtree(staging, ignore_errors=True)
    for aside in sorted(output_dir.parent.glob(f".{name}.previous-export-*")):
        output_dir.mkdir(parents=True, exist_ok=True)
        for entry in aside.iterdir():
            if not (output_dir / entry.name).exists():
                os.replace(entry, output_dir / entry.name)
        shutil.rmtree(aside, ignore_errors=True)


def _swap_in(output_dir: Path, staging: Path, previous: list[str], new: list[str]) -> None:
    """Move the `previous` entries of `output_dir` aside into the staging folder, then the `new` ones in. Every step
    is a rename that is skipped once done, so running it again after a kill at any point finishes the swap."""
    aside = staging / PREVIOUS_EXPORT
    aside.mkdir(exist_ok=True)
    for name in previous:
        if (output_dir / name).exists() and not (aside / name).exists():
            os.replace(output_dir / name, aside / name)
    for name in new:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)


def replace_export(output_dir: Path, staging: Path) -> None:
    """Move the complete export in `staging` into `output_dir`, in place of the previous export there.

    The previous export's entries ([`export_entries`]) and any entry the new export writes are moved aside into the
    staging folder, then the new entries in. The plan is written into the staging folder first: a run killed during
    the moves is finished by the next export's [`recover_interrupted_export`], so the folder never stays without
    an export. If a move fails, everything is put back as it was.
    """
    previous = export_entries(output_dir)
    new = sorted(path.name for path in staging.iterdir() if path.name not in (SWAP_JOURNAL, PREVIOUS_EXPORT))
    plan = {"previous": sorted(previous | {name for name in new if (output_dir / name).exists()}), "new": new}
    journal = staging / SWAP_JOURNAL
    (staging / f"{SWAP_JOURNAL}.tmp").write_text(json.dumps(plan), encoding="utf-8")
    os.replace(staging / f"{SWAP_JOURNAL}.tmp", journal)
    try:
        _swap_in(output_dir, staging, plan["previous"], plan["new"])
    except Exception:
        aside = staging / PREVIOUS_EXPORT
        for name in new:
            if (output_dir / name).exists() and not (staging / name).exists():
                os.replace(output_dir / name, staging / name)
        for name in plan["previous"]:
            if (aside / name).exists() and not (output_dir / name).exists():
                os.replace(aside / name, output_dir / name)
        journal.unlink()
        raise
    journal.unlink()


def save_student_lora(output_dir: Path, family: ModelFamily, weights: StudentWeights) -> Path:
    """`pytorch_lora_weights.safetensors` in diffusers format, with the LoRA config in its metadata so that
    `load_lora_weights` rebuilds the same rank and alpha.

    The keys stay in PEFT form (`lora_A`/`lora_B`, prefixed by the backbone's name), which `load_lora_weights` reads
    as is. `convert_state_dict_to_diffusers` is not used: it renames only the attention projections, and the mixed
    file it makes from the student's wider targets (resnet convs, feed-forward, SD3's `add_*_proj`) loses those keys
    on loading.
    """
    save_kwargs = family.lora_save_kwargs(weights.lora_state_dict)
    save_kwargs[f"{family.backbone_name}_lora_adapter_metadata"] = weights.lora_config
    family.pipeline_class().save_lora_weights(output_dir, safe_serialization=True, **save_kwargs)
    return output_dir / LORA_WEIGHT_NAME


def save_comfy_lora(output_dir: Path, family: ModelFamily, weights: StudentWeights) -> Path | None:
    """`pytorch_lora_weights_kohya.safetensors`: the same LoRA in the keys ComfyUI, Forge and Automatic1111 read
    (see `lora_formats.py`), with kohya's `ss_network_*` metadata. `None`, with a warning, for a family whose key form
    is not known (the diffusers file is still written)."""
    style = family.comfy_lora_style
    if style is None:
        logger.warning(
            f"No ComfyUI / kohya LoRA key form is known for the {family.name!r} family (its `comfy_lora_style`); only "
            f"{LORA_WEIGHT_NAME} is written."
        )
        return None
    state_dict = peft_to_comfy_lora(weights.lora_state_dict, weights.lora_config, style, prefix=family.backbone_name)
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(weights.lora_config["r"]),
        "ss_network_alpha": str(
            weights.lora_config["lora_alpha"] if style in (UNET_STYLE, WAN_STYLE) else weights.lora_config["r"]
        ),
    }
    path = output_dir / KOHYA_LORA_WEIGHT_NAME
    save_file(state_dict, path, metadata=metadata)
    return path


def _copy_code(folder: Path) -> None:
    """The code files of a LoRA-only export (no model_index.json: the card loads the teacher with them)."""
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pipeline_dmdr.__file__, folder / f"{PIPELINE_MODULE}.py")
    shutil.copyfile(scheduling_dmdr.__file__, folder / "scheduler" / f"{SCHEDULER_MODULE}.py")
