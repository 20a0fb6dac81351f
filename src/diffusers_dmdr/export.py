"""Export a trained DMDR student as a Hub-ready folder, and push it.

The export folder (the run's `output_dir` at the end of training; any folder from the `export` entry point) holds:

```
README.md                          model card: metadata, samples, loading snippets, sampler, recipe
samples.png                        the validation prompts sampled by the student (when there are any)
pytorch_lora_weights.safetensors   the student LoRA in diffusers format (LoRA mode)
pipeline_dmdr.py                   FewStepDMDRPipeline, copied verbatim from the package
scheduler/                         DMDRScheduler config (the trained timesteps) + scheduling_dmdr.py
model_index.json, unet/ or transformer/, vae/, text_encoder*/, tokenizer*/
                                   the full student pipeline (full mode, or LoRA mode with export_full_pipeline)
```

Checkpoints and logs may sit in the same folder; they are never uploaded.

Command line (also installed as `dmdr-export`):

```
python -m diffusers_dmdr.export --checkpoint output_dir/checkpoint-3000 --output_dir export \
    [--push_to_hub --hub_model_id org/name]
```
"""

import argparse
import copy
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from .adapters import (
    FAKE_ADAPTER,
    STUDENT_ADAPTER,
    add_lora_adapter,
    load_adapter_state_dict,
    parse_target_modules,
)
from .checkpointing import CONFIG_FILE, STUDENT_FULL_FILE, STUDENT_LORA_FILE, list_checkpoints, resolve_checkpoint
from .config import DMDRConfig
from .families import ModelFamily, detect_family, get_family, read_teacher_config
from .families.base import student_scheduler_for
from .hub import (  # noqa: F401  (HubUploadError, UPLOAD_IGNORE_PATTERNS and hub_id_of are part of this module's API)
    UPLOAD_IGNORE_PATTERNS,
    HubUploadError,
    cached_model_card_data,
    hub_id_of,
    push_folder,
    remote_model_card_data,
)
from .pipelines import pipeline_dmdr, scheduling_dmdr
from .pipelines.pipeline_dmdr import SCHEDULER_CLASS, SCHEDULER_MODULE, FewStepDMDRPipeline
from .pipelines.scheduling_dmdr import DMDRScheduler
from .utils import redact_local_paths, redact_local_paths_in, save_image_grid


logger = logging.getLogger(__name__)

PIPELINE_MODULE, PIPELINE_CLASS = "pipeline_dmdr", "FewStepDMDRPipeline"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "train_summary.json"
PAPER_URL = "https://huggingface.co/papers/2511.13649"
# Tags every export carries, besides the family's and `lora` in LoRA mode.
BASE_TAGS = ["text-to-image", "diffusers", "diffusers-training", "dmdr", "distillation", "few-step"]
FAMILY_TAGS = {
    "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    "sd15": ["stable-diffusion", "stable-diffusion-diffusers"],
    "sd3": ["sd3", "sd3-diffusers"],
}
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SNIPPET_PROMPT = "a photo of a red fox in the snow"


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
    validation prompts and seed. Call it on every process: under FSDP and DeepSpeed the student's weights are gathered
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
    full_pipeline = None
    if config.training_mode == "full" or config.export_full_pipeline:
        backbone = _student_backbone_from_trainer(trainer, weights)
        pipeline = _assemble_pipeline(trainer.pipeline, trainer.family, trainer.scheduler, backbone)
        full_pipeline = _finalise_full_pipeline(pipeline, config, weights)
    metrics = {key: value for key, value in (trainer.history[-1] if trainer.history else {}).items() if key != "step"}
    output_dir = write_export(
        config.output_dir,
        config,
        trainer.family,
        trainer.scheduler,
        weights,
        full_pipeline=full_pipeline,
        sample_images=sample_images,
        metrics=metrics,
        hub_model_id=config.hub_model_id,
        hub_timeout=config.hub_timeout if config.push_to_hub else None,
    )
    if config.push_to_hub:
        push_to_hub(
            output_dir,
            config.hub_model_id,
            private=config.hub_private,
            checkpoint=config.output_dir,
            timeout=config.hub_timeout,
        )
    return output_dir


def _student_backbone_from_trainer(trainer, weights: StudentWeights) -> torch.nn.Module:
    """A standalone float32 student backbone on the CPU, built from what the trainer holds.

    Unsharded runs copy the trainer's own modules (the base, or the full student) and drop the fake adapter. Sharded
    runs hold only shards of the base, so its backbone alone is read again (never the whole teacher pipeline) and
    the gathered student weights are applied to it.
    """
    module = trainer.training_module
    if trainer.sharded:
        config = trainer.config
        backbone = trainer.family.load_backbone(config.pretrained_model_name_or_path, config.revision, config.variant)
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
    checkpoint_dir = _resolve_checkpoint_dir(Path(checkpoint))
    # The export builds no reward, so the import paths of the run's rewards are never imported here.
    config = DMDRConfig.from_yaml(checkpoint_dir / CONFIG_FILE, allow_reward_import_paths=True)
    if export_full_pipeline is not None:
        config.export_full_pipeline = export_full_pipeline
    hub_model_id = hub_model_id or config.hub_model_id
    hub_timeout = config.hub_timeout if hub_timeout is None else hub_timeout
    if push and not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id org/name (the run's config has none).")
    family = _family_of(config)
    if config.training_mode == "lora":
        lora_state_dict = load_file(checkpoint_dir / STUDENT_LORA_FILE)
        weights = StudentWeights(lora_state_dict=lora_state_dict)
    else:
        weights = StudentWeights(full_state_dict=load_file(checkpoint_dir / STUDENT_FULL_FILE))
    teacher = family.load_teacher(config.pretrained_model_name_or_path, config.revision, config.variant)
    scheduler = _student_scheduler(config, teacher)
    pipeline = _assemble_pipeline(teacher.pipeline, family, scheduler, _student_backbone(teacher, config, weights))
    if weights.is_lora:
        weights.lora_config = pipeline.backbone.peft_config[STUDENT_ADAPTER].to_dict()

    sample_images = None
    prompts = _sample_prompts(config)
    if prompts:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        sample_images = pipeline(
            prompts,
            height=config.image_size[0],
            width=config.image_size[1],
            generator=torch.Generator("cpu").manual_seed(config.seed),
            output_type="pt",
        ).images.cpu()
        pipeline.to("cpu")
    full_pipeline = None
    if config.training_mode == "full" or config.export_full_pipeline:
        full_pipeline = _finalise_full_pipeline(pipeline, config, weights)
    # The run's summary holds the last logs; they describe this checkpoint only if it is the final one.
    summary_file = checkpoint_dir.parent / SUMMARY_FILE
    metrics = {}
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if summary.get("global_step") == int(checkpoint_dir.name.split("-")[1]) and summary.get("history"):
            metrics = {key: value for key, value in summary["history"][-1].items() if key != "step"}
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
        base_model=base_model,
        checkpoint_name=checkpoint_dir.name,
        hub_timeout=hub_timeout if push else None,
    )
    if push:
        private = config.hub_private if hub_private is None else hub_private
        push_to_hub(output_dir, hub_model_id, private=private, checkpoint=checkpoint_dir, timeout=hub_timeout)
    return output_dir


def export_pipeline(pipeline: FewStepDMDRPipeline, output_dir: str | Path) -> Path:
    """Save a (possibly reloaded) [`FewStepDMDRPipeline`] so that all three loading routes work on the folder.

    `save_pretrained` writes `_class_name` as a plain string and names the scheduler by its Python module; this
    rewrites `model_index.json` to the repository-code form and copies `pipeline_dmdr.py` and
    `scheduler/scheduling_dmdr.py` from the package.
    """
    if type(pipeline.scheduler).__name__ != SCHEDULER_CLASS:
        raise ValueError(f"export_pipeline needs a {SCHEDULER_CLASS}, got {type(pipeline.scheduler).__name__}.")
    output_dir = Path(output_dir)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    add_pipeline_code(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Building the student pipeline
# ----------------------------------------------------------------------------------------------------------------
def _student_backbone(teacher, config: DMDRConfig, weights: StudentWeights) -> torch.nn.Module:
    """The teacher's backbone carrying the student: the `student` adapter (LoRA mode) or the full weights."""
    return _apply_student_weights(teacher.backbone, teacher.family, config, weights)


def _apply_student_weights(backbone, family: ModelFamily, config: DMDRConfig, weights: StudentWeights):
    if weights.is_lora:
        targets = parse_target_modules(config.lora_target_modules, family.student_lora_targets)
        add_lora_adapter(backbone, STUDENT_ADAPTER, config.lora_rank, config.lora_alpha, targets)
        load_adapter_state_dict(backbone, STUDENT_ADAPTER, weights.lora_state_dict)
    else:
        backbone.load_state_dict(weights.full_state_dict, strict=True)
    return backbone.eval()


def _assemble_pipeline(stock_pipeline, family: ModelFamily, scheduler, backbone) -> FewStepDMDRPipeline:
    expected_components, _ = FewStepDMDRPipeline._get_signature_keys(FewStepDMDRPipeline)
    components = {name: module for name, module in stock_pipeline.components.items() if name in expected_components}
    components.update({"scheduler": scheduler, family.backbone_name: backbone})
    return FewStepDMDRPipeline(**components)


def _finalise_full_pipeline(
    pipeline: FewStepDMDRPipeline, config: DMDRConfig, weights: StudentWeights
) -> FewStepDMDRPipeline:
    if weights.is_lora:
        # Fused in float32 before any cast, so the saved weights lose nothing to the adapter arithmetic.
        pipeline.backbone.fuse_lora(adapter_names=[STUDENT_ADAPTER])
        pipeline.backbone.unload_lora()
    dtype = EXPORT_DTYPES.get(config.mixed_precision, torch.float32)
    # The teacher is loaded in float32: cast only when the run used another precision.
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def _student_scheduler(config: DMDRConfig, teacher) -> DMDRScheduler:
    timesteps = config.student_timesteps or teacher.family.default_student_timesteps(
        config.num_student_steps, config.shift
    )
    return student_scheduler_for(
        teacher, timesteps, config.backward_simulation, config.shift, config.flow_x0_noise_level
    )


def _family_of(config: DMDRConfig) -> ModelFamily:
    if config.family != "auto":
        return get_family(config.family)
    model_index = read_teacher_config(config.pretrained_model_name_or_path, config.revision)
    return get_family(detect_family(model_index, config.pretrained_model_name_or_path))


def _resolve_checkpoint_dir(path: Path) -> Path:
    if (path / CONFIG_FILE).is_file() and path.name.startswith("checkpoint-"):
        return path
    if list_checkpoints(path):
        return resolve_checkpoint(path, "latest")
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
) -> Path:
    """Write the export folder (see the module docstring) and return it. No Hub request is sent unless
    `hub_timeout` is given (an export about to be pushed may then read the teacher's card within that time).

    Args:
        output_dir: the folder; files of a previous export are overwritten, other files are left alone.
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
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if weights.is_lora:
        save_student_lora(output_dir, family, weights)
    if full_pipeline is not None:
        export_pipeline(full_pipeline, output_dir)
    else:
        scheduler.save_pretrained(output_dir / "scheduler")
        _copy_code(output_dir)
    if sample_images is not None:
        save_image_grid(sample_images, output_dir / SAMPLES_FILE, rows=len(config.validation_prompts))
    card = make_model_card(
        config,
        family,
        scheduler,
        repo_id=hub_model_id or output_dir.name,
        base_model=base_model,
        has_lora=weights.is_lora,
        has_full_pipeline=full_pipeline is not None,
        has_samples=sample_images is not None,
        metrics=metrics,
        checkpoint_name=checkpoint_name,
        existing_card=output_dir / "README.md",
        hub_timeout=hub_timeout,
    )
    # What is published names no local folder: absolute paths become `<local>/<name>` in the recipe, and in the card
    # of an export about to be pushed (a local card keeps them so that its snippets run here; the run's checkpoints
    # keep their own, unredacted dmdr_config.yaml).
    card_text = str(card) if hub_timeout is None else redact_local_paths(str(card))
    (output_dir / "README.md").write_text(card_text, encoding="utf-8")
    public_config = redact_local_paths_in(
        {k: v for k, v in config.to_dict().items() if k != "allow_reward_import_paths"}
    )
    (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(public_config, sort_keys=False), encoding="utf-8")
    logger.info(f"Exported the DMDR student to {output_dir}")
    return output_dir


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


def add_pipeline_code(folder: str | Path) -> None:
    """Point `model_index.json` at the repository's own code and copy that code in (after `save_pretrained`)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    model_index = json.loads(index_file.read_text(encoding="utf-8"))
    model_index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    model_index["scheduler"] = [SCHEDULER_MODULE, SCHEDULER_CLASS]
    index_file.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _copy_code(folder)


def _copy_code(folder: Path) -> None:
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pipeline_dmdr.__file__, folder / f"{PIPELINE_MODULE}.py")
    shutil.copyfile(scheduling_dmdr.__file__, folder / "scheduler" / f"{SCHEDULER_MODULE}.py")


# ----------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------
def teacher_license(
    source: str, hub_id: str | None = None, revision: str | None = None, hub_timeout: float | None = None
) -> dict[str, str]:
    """`license` (with `license_name`/`license_link` for custom licenses) from the teacher's model card: the
    `README.md` of a local teacher folder, else the card of `hub_id` from the local Hub cache, else (only with
    `hub_timeout`, i.e. when the export is pushed) from the Hub within `hub_timeout` seconds. Empty when none."""
    from huggingface_hub import ModelCard

    local_card = Path(source).expanduser() / "README.md"
    if local_card.is_file():
        try:
            data = ModelCard.load(local_card).data.to_dict()
        except (OSError, ValueError) as error:
            logger.warning(f"Could not read {local_card} ({type(error).__name__}); the card has no license.")
            data = {}
    elif hub_id is None:
        return {}
    else:
        data = cached_model_card_data(hub_id, revision)
        if not data and hub_timeout is not None:
            data = remote_model_card_data(hub_id, revision, hub_timeout)
    found = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
    link = found.get("license_link")
    if link and hub_id and not link.startswith(("http://", "https://")):
        # A relative link points into the teacher's repo, not into the export.
        found["license_link"] = f"https://huggingface.co/{hub_id}/blob/{revision or 'main'}/{link}"
    return found


def make_model_card(
    config: DMDRConfig,
    family: ModelFamily,
    scheduler: DMDRScheduler,
    repo_id: str,
    base_model: str | None = None,
    has_lora: bool = True,
    has_full_pipeline: bool = False,
    has_samples: bool = False,
    metrics: dict | None = None,
    checkpoint_name: str | None = None,
    existing_card: str | Path | None = None,
    hub_timeout: float | None = None,
):
    """The export's `ModelCard`: YAML metadata, samples, loading snippets, sampler, recipe and limitations.

    Built without any Hub request: `existing_card` (the README.md of a previous export in the same folder) keeps the
    metadata this export does not own; the teacher's licence comes from its folder or the local Hub cache, and from
    the Hub only when `hub_timeout` is given (a push), within that many seconds.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    source = config.pretrained_model_name_or_path
    base_model = base_model or hub_id_of(source)
    license_data = teacher_license(source, base_model, config.revision, hub_timeout)
    prompts = config.validation_prompts or []
    widget = [{"text": prompts[0], "output": {"url": SAMPLES_FILE}}] if has_samples and prompts else None
    body = _card_body(
        config,
        family,
        scheduler,
        repo_id=repo_id,
        base_model=base_model or source,
        has_lora=has_lora,
        has_full_pipeline=has_full_pipeline,
        has_samples=has_samples,
        metrics=metrics or {},
        checkpoint_name=checkpoint_name,
    )
    # A new export gets fresh metadata; a previous export's card (re-export into the same folder) keeps the metadata
    # this export does not own, while everything below is set afresh. The Hub is never asked for a card here.
    if existing_card is not None and Path(existing_card).is_file():
        card = ModelCard.load(existing_card)
    else:
        card = ModelCard("")
        card.data = ModelCardData(
            license=license_data.get("license"), library_name="diffusers", base_model=base_model, widget=widget
        )
    tags = BASE_TAGS + FAMILY_TAGS[family.name] + (["lora"] if has_lora else [])
    populate_model_card(card, tags=[tag for tag in tags if tag not in (card.data.tags or [])])
    owned = {"base_model": base_model, "widget": widget, "inference": True, "pipeline_tag": "text-to-image"}
    for key, value in {**owned, **license_data}.items():
        if value is not None:
            setattr(card.data, key, value)
    # The template's placeholder sections would follow ours; the export writes every section, so the body replaces them.
    card.text = body
    return card


def _card_body(
    config: DMDRConfig,
    family: ModelFamily,
    scheduler: DMDRScheduler,
    repo_id: str,
    base_model: str,
    has_lora: bool,
    has_full_pipeline: bool,
    has_samples: bool,
    metrics: dict,
    checkpoint_name: str | None,
) -> str:
    timesteps = list(scheduler.config.training_timesteps)
    num_steps = len(timesteps)
    if num_steps == 1:
        sampler_rule = "The single step maps pure noise to the clean prediction."
    elif scheduler.config.deterministic:
        sampler_rule = (
            "Between steps the clean prediction is re-noised deterministically (the ODE sampler: Euler for flow "
            "models, DDIM for DDPM models); the last step returns the clean prediction."
        )
    else:
        sampler_rule = (
            "Between steps the clean prediction is re-noised with fresh Gaussian noise (the DMD sampler); the last "
            "step returns the clean prediction."
        )
    is_hub_id = "/" in base_model and not Path(base_model).expanduser().exists()
    base_link = f"[`{base_model}`](https://huggingface.co/{base_model})" if is_hub_id else f"`{base_model}`"
    sections = [
        f"# {repo_id.split('/')[-1]}\n",
        f"A **{num_steps}-step** text-to-image student distilled from {base_link} with "
        f"[DMDR]({PAPER_URL}) (distribution matching distillation jointly with reinforcement learning from "
        "differentiable rewards), trained with "
        "[diffusers-dmdr](https://pypi.org/project/diffusers-dmdr/). It samples in "
        f"{num_steps} step{'s' if num_steps > 1 else ''} without classifier-free guidance.\n",
    ]
    if has_samples:
        prompt_list = "\n".join(f"- {prompt}" for prompt in config.validation_prompts)
        sections.append(
            f"## Samples\n\n![samples]({SAMPLES_FILE})\n\nOne row per prompt, {config.num_validation_images} "
            f"images each, {num_steps} step{'s' if num_steps > 1 else ''}, seed {config.seed}, "
            f"{config.resolution}x{config.resolution}:\n\n{prompt_list}\n"
        )
    sections.append(_usage_section(config, family, scheduler, repo_id, base_model, has_lora, has_full_pipeline))
    schedule_rows = "\n".join(
        f"| {index} | {timestep:g} | {timestep / scheduler.config.num_train_timesteps:.4f} |"
        for index, timestep in enumerate(timesteps)
    )
    sections.append(
        "## Sampler\n\n"
        f"The student was trained with, and samples with, this {num_steps}-step grid "
        f"(`prediction_type={scheduler.config.prediction_type}`, {scheduler.config.num_train_timesteps} teacher "
        "timesteps). The first step always starts from pure noise.\n\n"
        "| step | timestep (model units) | noise level |\n|---|---|---|\n"
        f"{schedule_rows}\n\n"
        f"{sampler_rule} `DMDRScheduler` (in `scheduler/`) stores this grid in its config. Another "
        "`num_inference_steps` works with a warning: the grid is then interpolated linearly between the trained "
        "first and last timesteps, which the student was not trained for.\n"
    )
    sections.append(_recipe_section(config, family, has_lora, checkpoint_name))
    if metrics:
        rows = "\n".join(
            f"| `{name}` | {value:.4g} |"
            for name, value in sorted(metrics.items())
            if isinstance(value, int | float) and name.startswith(("reward/", "heldout_reward/", "loss", "monitor/"))
        )
        if rows:
            sections.append(
                "## Training metrics\n\nLogged at the last generator step (training prompts, not a benchmark):\n\n"
                f"| metric | value |\n|---|---|\n{rows}\n"
            )
    files = [
        f"- `{LORA_WEIGHT_NAME}`: the student LoRA in diffusers format (`load_lora_weights`)." if has_lora else "",
        "- `model_index.json` and the component folders: the full student pipeline (safetensors)."
        if has_full_pipeline
        else "",
        f"- `{PIPELINE_MODULE}.py`, `scheduler/{SCHEDULER_MODULE}.py`: the sampler code, loaded with "
        "`trust_remote_code=True` or from the `diffusers-dmdr` package.",
        f"- `{SAMPLES_FILE}`: the sample grid above." if has_samples else "",
    ]
    sections.append("## Files\n\n" + "\n".join(line for line in files if line) + "\n")
    sections.append(
        "## Limitations\n\n"
        f"- This is a derivative of {base_link}: its license and use restrictions apply, and it inherits the "
        "teacher's biases.\n"
        "- Few-step students trade some sample diversity for speed; rewards can be over-optimised (reward "
        "hacking), so check samples beyond the training prompts.\n"
        "- Classifier-free guidance, negative prompts and step counts other than the trained one are outside "
        "what was trained.\n"
    )
    return "\n".join(sections)


SNIPPET_DEVICE_LINE = (
    'device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)\n'
)


def _snippet(imports: list[str], body: str) -> str:
    """A runnable snippet: `torch` and `imports`, the device choice, then `body` (which defines `image`)."""
    return "import torch\n" + "".join(line + "\n" for line in imports) + "\n" + SNIPPET_DEVICE_LINE + body


def _usage_section(
    config: DMDRConfig,
    family: ModelFamily,
    scheduler: DMDRScheduler,
    repo_id: str,
    base_model: str,
    has_lora: bool,
    has_full_pipeline: bool,
) -> str:
    prompt = (config.validation_prompts or [DEFAULT_SNIPPET_PROMPT])[0]
    size = ""
    if config.image_size != (family.default_resolution,) * 2:
        size = f", height={config.image_size[0]}, width={config.image_size[1]}"
    stock_class = family.pipeline_class_name
    call = f'image = pipe("{prompt}"{size}).images[0]\n'
    if has_full_pipeline:
        route_package = _snippet(
            ["from diffusers_dmdr.pipelines import FewStepDMDRPipeline"],
            f'pipe = FewStepDMDRPipeline.from_pretrained("{repo_id}", torch_dtype=dtype).to(device)\n' + call,
        )
        route_remote = _snippet(
            ["from diffusers import DiffusionPipeline"],
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=dtype)\n'
            "pipe = pipe.to(device)\n" + call,
        )
    else:
        # No full pipeline in the repo: the student is the base model plus the LoRA, sampled by FewStepDMDRPipeline.
        student = (
            f'base = {stock_class}.from_pretrained("{base_model}", torch_dtype=dtype)\n'
            f'base.load_lora_weights("{repo_id}")\n'
            "base.fuse_lora()\n"
            f'scheduler = DMDRScheduler.from_pretrained("{repo_id}", subfolder="scheduler")\n'
            "pipe = FewStepDMDRPipeline.from_pipe(base, scheduler=scheduler).to(device)\n"
        )
        route_package = _snippet(
            [
                f"from diffusers import {stock_class}",
                "from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline",
            ],
            student + call,
        )
        route_remote = _snippet(
            [f"from diffusers import {stock_class}", "from diffusers.utils import get_class_from_dynamic_module"],
            "FewStepDMDRPipeline = get_class_from_dynamic_module(\n"
            f'    "{repo_id}", "{PIPELINE_MODULE}.py", class_name="{PIPELINE_CLASS}", trust_remote_code=True\n'
            ")\n"
            "DMDRScheduler = get_class_from_dynamic_module(\n"
            f'    "{repo_id}", "{SCHEDULER_MODULE}.py", subfolder="scheduler", class_name="{SCHEDULER_CLASS}",\n'
            "    trust_remote_code=True,\n"
            ")\n" + student + call,
        )
    route_plain = _plain_route(family, scheduler, repo_id, base_model, has_lora, prompt, size)
    lines = [
        "## How to use\n",
        "The trained sampler is `FewStepDMDRPipeline` with `DMDRScheduler`: same timesteps, same re-noising rule, no "
        "guidance (the defaults), so a seed gives the images the training produced. Three ways to load it:\n",
        "### 1. With the `diffusers-dmdr` package (`pip install diffusers-dmdr`), no remote code\n",
        f"```python\n{route_package}```\n",
        "### 2. With diffusers only, running this repository's code\n",
        f"`{PIPELINE_MODULE}.py` and `scheduler/{SCHEDULER_MODULE}.py` are plain diffusers code; read them first, "
        "and pin `revision=` to a commit you checked.\n",
        f"```python\n{route_remote}```\n",
        "### 3. A stock diffusers pipeline and scheduler\n",
        "No custom code: the stock scheduler below follows the same timesteps with its own update rule, which matches "
        "the trained sampler closely but not bit for bit"
        + (" (it feeds the model `1000 t` where training fed `round(1000 t)`)" if family.is_flow else "")
        + ".\n",
        f"```python\n{route_plain}```\n",
    ]
    return "\n".join(lines)


def _plain_route(
    family: ModelFamily,
    scheduler: DMDRScheduler,
    repo_id: str,
    base_model: str,
    has_lora: bool,
    prompt: str,
    size: str,
) -> str:
    stock_class = family.pipeline_class_name
    timesteps = list(scheduler.config.training_timesteps)
    deterministic = scheduler.config.deterministic
    if family.is_flow:
        scheduler_class = "FlowMatchEulerDiscreteScheduler"
        noise_levels = [round(t / scheduler.config.num_train_timesteps, 6) for t in timesteps]
        # shift=1: the sigmas passed in the call are the trained grid, already shifted.
        set_scheduler = (
            f"pipe.scheduler = {scheduler_class}.from_config(\n"
            f"    pipe.scheduler.config, shift=1.0, stochastic_sampling={not deterministic}\n)\n"
        )
        call = f'image = pipe("{prompt}", sigmas={noise_levels}, guidance_scale=0.0, max_sequence_length=128{size})'
    else:
        # LCM re-noises with fresh noise (the DMD sampler); a one-step student has nothing to re-noise.
        stochastic = not deterministic or len(timesteps) == 1
        scheduler_class = "LCMScheduler" if stochastic else "EulerDiscreteScheduler"
        set_scheduler = f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config)\n"
        call = f'image = pipe("{prompt}", timesteps={[int(t) for t in timesteps]}, guidance_scale=0.0{size})'
    if has_lora:
        imports = [f"from diffusers import {scheduler_class}, {stock_class}"]
        load = (
            f'pipe = {stock_class}.from_pretrained("{base_model}", torch_dtype=dtype)\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            "pipe.fuse_lora()\n"
        )
    else:
        name = family.backbone_name
        backbone_class = "SD3Transformer2DModel" if family.is_flow else "UNet2DConditionModel"
        imports = [f"from diffusers import {backbone_class}, {scheduler_class}, {stock_class}"]
        load = (
            f'{name} = {backbone_class}.from_pretrained("{repo_id}", subfolder="{name}", torch_dtype=dtype)\n'
            f'pipe = {stock_class}.from_pretrained("{base_model}", {name}={name}, torch_dtype=dtype)\n'
        )
    return _snippet(imports, load + set_scheduler + "pipe = pipe.to(device)\n" + call + ".images[0]\n")


def _recipe_section(config: DMDRConfig, family: ModelFamily, has_lora: bool, checkpoint_name: str | None) -> str:
    rewards = ", ".join(f"`{spec}`" for spec in config.reward) or "none (DMD only)"
    eval_rewards = ", ".join(f"`{spec}`" for spec in config.eval_reward) or "none"
    adapter = (
        f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha}" if has_lora else "full fine-tuning of the backbone"
    )
    rows = [
        ("teacher", f"`{config.pretrained_model_name_or_path}` ({family.name})"),
        ("student", adapter),
        ("student steps", str(config.num_student_steps)),
        ("resolution", f"{config.resolution}x{config.resolution}"),
        ("generator updates", f"{config.max_train_steps} (stage 1, DMD only: {config.cold_start_steps})"),
        ("rewards (stage 2, `name:weight`)", rewards),
        ("held-out rewards (logged only)", eval_rewards),
        ("reward-tilted DMD in stage 1", str(config.reward_tilt)),
        (
            "DynaDG / DynaRS",
            f"real-score LoRA scale {config.real_score_lora_scale} -> 0, re-noising Beta({config.renoise_beta_alpha}, "
            f"{config.renoise_beta_beta}) -> Beta(1, 1), over {config.dynamic_steps} steps",
        ),
        ("fake score", f"LoRA rank {config.fake_lora_rank}, scale {config.fake_score_lora_scale}"),
        ("fake-score updates per generator update", str(config.update_ratio)),
        ("real-score CFG", f"{config.real_guidance_scale} +- {config.guidance_scale_jitter}"),
        ("learning rates (student / fake)", f"{config.learning_rate:g} / {config.learning_rate_fake:g}"),
        ("batch size per process", str(config.train_batch_size)),
        ("mixed precision", str(config.mixed_precision or "no")),
        ("seed", str(config.seed)),
    ]
    if checkpoint_name:
        rows.append(("exported checkpoint", checkpoint_name))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "## Training recipe\n\n"
        "Stage 1 distils the teacher with DMD (with the DynaDG and DynaRS cold-start schedules); stage 2 adds the "
        "reward losses to DMD, which keeps regularising the student towards the teacher's distribution.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------
def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DMDR few-step student",
    checkpoint: str | Path | None = None,
    timeout: float = 90.0,
) -> str:
    """Create `repo_id` (if needed) and upload `folder`, leaving checkpoints and logs out (see `hub.push_folder`).

    The token is the one given or the logged-in one; it is never logged nor written anywhere.

    Args:
        folder (`str` or `Path`): the export folder.
        repo_id (`str`): the Hub repo, `org/name`.
        private (`bool`, defaults to `False`): create the repo as private.
        token (`str`, *optional*): a Hub token; defaults to the logged-in one.
        commit_message (`str`): the commit message.
        checkpoint (`str` or `Path`, *optional*): the checkpoint the folder was exported from, for the retry
            command of the error message; defaults to `folder` (a run's output_dir holding its checkpoints).
        timeout (`float`, defaults to 90.0): seconds each Hub call (repo creation, upload) may take, retries included.

    Raises:
        [`HubUploadError`]: on any failure or timeout, with the command that retries; the local folder is untouched.

    Returns:
        `str`: the URL of the commit.
    """
    retry = (
        f"dmdr-export --checkpoint {checkpoint or folder} --output_dir {folder} --push_to_hub --hub_model_id {repo_id}"
    )
    return push_folder(
        folder, repo_id, retry, private=private, token=token, commit_message=commit_message, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dmdr.export",
        description="Export a DMDR checkpoint as a Hub-ready folder (and optionally push it).",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N folder, or a run's output_dir (latest)")
    parser.add_argument("--output_dir", required=True, help="the export folder (may be the run's output_dir)")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to the Hub")
    parser.add_argument("--hub_model_id", default=None, help="repo id org/name (default: the run's hub_model_id)")
    parser.add_argument("--hub_private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument(
        "--export_full_pipeline",
        action="store_true",
        default=None,
        help="also save the fused full pipeline in LoRA mode (default: the run's setting)",
    )
    parser.add_argument("--base_model", default=None, help="the teacher's Hub id, if the run used a local copy")
    parser.add_argument("--device", default=None, help="device that samples the grid (default: cuda if available)")
    parser.add_argument(
        "--hub_timeout", type=float, default=None, help="seconds each Hub request may take (default: the run's)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_argument_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        output_dir = export_checkpoint(
            args.checkpoint,
            args.output_dir,
            push=args.push_to_hub,
            hub_model_id=args.hub_model_id,
            hub_private=args.hub_private,
            export_full_pipeline=args.export_full_pipeline,
            base_model=args.base_model,
            device=args.device,
            hub_timeout=args.hub_timeout,
        )
    except HubUploadError as error:
        print(error, file=sys.stderr)  # noqa: T201
        sys.exit(1)
    print(f"exported to {output_dir}")  # noqa: T201


if __name__ == "__main__":
    main()
