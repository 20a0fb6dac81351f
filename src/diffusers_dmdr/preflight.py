"""Checks of a run's inputs that need no weights: they fail in seconds, with a message naming the fix."""

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import DMDRConfig
from .data import load_prompts
from .families import ModelFamily, detect_family, get_family, read_teacher_config
from .families.base import read_component_config, read_scheduler_config, student_grid_for
from .memory_plan import MemoryPlan, memory_plan_for
from .pipelines.scheduling_dmdr import DMDRScheduler
from .sharding import check_engine_supported


logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What the checks resolved: the family, the student grid, the prompts, the parsed rewards and the memory plan
    (`None` only when `model_index.json` lists no backbone to plan for)."""

    family: ModelFamily
    student_timesteps: list[float]
    prompts: list[str]
    reward_specs: list
    eval_reward_specs: list
    memory_plan: MemoryPlan | None = None


def check_run_inputs(config: DMDRConfig) -> RunPlan:
    """Validate everything about `config` that can be checked before any weight is loaded."""
    from .rewards import check_recipe_import_paths, parse_reward_spec, resolve_reward_factory, validate_reward_specs
    from .rewards.core import reward_import_paths
    from .rewards.scores import is_score_reward

    # The engine the launch asked for (DeepSpeed is refused: see sharding.py).
    check_engine_supported()
    check_recipe_import_paths(config)  # first: the other checks import what the rewards name
    # 1. Teacher: the folder or Hub id exists and is a supported family.
    model_index = read_teacher_config(config.pretrained_model_name_or_path, config.revision)
    detected = detect_family(model_index, config.pretrained_model_name_or_path)
    if config.family not in ("auto", detected):
        raise ValueError(
            f"--family {config.family} does not match the teacher, which is a {detected} pipeline; "
            "drop --family or pass --family auto."
        )
    family = get_family(detected)
    family.check_teacher(model_index, config.pretrained_model_name_or_path, config.revision)

    # 2. Resolution against the VAE's spatial factor. Non-square training is wired through the UNet families' size
    # conditioning only; the flow transformers' grids (dynamic shift) and packing assume a square image.
    if config.width not in (None, config.resolution) and not family.supports_non_square:
        raise ValueError(
            f"--width {config.width} (non-square training) is supported for SDXL and SD1.5 teachers; this teacher is "
            f"a {family.name} pipeline: drop --width."
        )
    factor = family.vae_scale_factor(config.pretrained_model_name_or_path, config.revision)
    multiple = factor * family.latent_patch_size
    for flag, size in (("--resolution", config.resolution), ("--width", config.width)):
        if size is not None and size % multiple:
            lower = max(multiple, size // multiple * multiple)
            what = f"the VAE's factor {factor}"
            if family.latent_patch_size > 1:
                patch = family.latent_patch_size
                what = f"{multiple} (the VAE's factor {factor} x the backbone's {patch}x{patch} latent patches)"
            raise ValueError(f"{flag} {size} is not divisible by {what}; use e.g. {lower} or {lower + multiple}.")

    # 2b. The backbone denoises the VAE's latents alone (an inpainting UNet also takes a mask and a masked image).
    check_backbone_channels(config, family)

    # 3. Student grid: the scheduler validates range and order.
    scheduler_config = {}
    if family.grid_uses_teacher_scheduler and not config.student_timesteps:
        scheduler_config = read_scheduler_config(config.pretrained_model_name_or_path, config.revision)
    timesteps, _ = student_grid_for(family, config, scheduler_config, factor)
    if len(timesteps) != config.num_student_steps:
        raise ValueError(f"{len(timesteps)} student timesteps for --num_student_steps {config.num_student_steps}.")
    try:
        DMDRScheduler(prediction_type="flow" if family.is_flow else "epsilon", training_timesteps=timesteps)
    except ValueError as error:
        raise ValueError(f"--student_timesteps: {error}") from error

    # 4. Rewards: names or import paths resolve, local model files exist.
    reward_specs = [parse_reward_spec(text) for text in config.reward]
    eval_specs = [parse_reward_spec(text) for text in config.eval_reward]
    if config.allow_reward_import_paths:
        imported = [path for spec in reward_specs + eval_specs for path in reward_import_paths(spec)]
        if imported:
            logger.warning(f"--allow_reward_import_paths: importing user code {imported} for the rewards.")
    validate_reward_specs(reward_specs + eval_specs)
    if config.rl != "refl" and not reward_specs:
        raise ValueError(f"--rl {config.rl} trains on rewards: give at least one --reward.")
    if config.rl == "refl":
        for spec in reward_specs:
            if is_score_reward(resolve_reward_factory(spec.name)):
                raise ValueError(
                    f"Reward {spec.name!r} has no gradients (differentiable = False) and --rl refl back-propagates "
                    "rewards: train on it with --rl grpo or --rl dpo."
                )
    if config.reward_tilt and not reward_specs:
        raise ValueError("--reward_tilt weights DMD by a reward: give at least one --reward.")
    if config.dmd_loss_weight == 0 and not reward_specs:
        raise ValueError("--dmd_loss_weight 0 with no --reward leaves nothing to train the student on.")

    if config.reward_vae_model_name_or_path:
        check_reward_vae(config.reward_vae_model_name_or_path, config.reward_vae_revision)

    # 4b. Student initialisation: the file kind fits the training mode, a LoRA fits the configured rank.
    if config.student_init_path:
        check_student_init(config)

    # 5. Optional dependencies asked for.
    # (`all` means "every installed tracker" to accelerate, so it needs none in particular.)
    for tracker in ("wandb", "tensorboard"):
        if config.report_to == tracker and not _tracker_installed(tracker):
            raise ImportError(
                f"--report_to {config.report_to} needs {tracker}: `pip install {tracker}`, or pass --report_to none."
            )
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "--use_8bit_adam needs bitsandbytes: `pip install diffusers-dmdr[bnb]`, or drop --use_8bit_adam."
        )

    # 6. Resume target.
    if config.resume_from_checkpoint not in (None, "latest"):
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir() and not (Path(config.output_dir) / config.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder.")

    # 6b. Where checkpoints and the export go.
    check_output_dir(config.output_dir)

    # 7. Prompts (through `datasets`; cheap for local files).
    prompts = load_prompts(
        config.train_prompts,
        prompt_column=config.prompt_column,
        split=config.dataset_split,
        config_name=config.dataset_config_name,
        max_samples=config.max_train_samples,
    )
    # 8. Memory plan: exact weight, gradient and optimizer bytes from the component configs (meta device, no weights).
    memory_plan = memory_plan_for(config, family, model_index)
    return RunPlan(family, list(timesteps), prompts, reward_specs, eval_specs, memory_plan)


def _tracker_installed(name: str) -> bool:
    if name == "tensorboard":
        # accelerate's tensorboard tracker runs on either package.
        return any(importlib.util.find_spec(module) is not None for module in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(name) is not None


def check_reward_vae(name_or_path: str, revision: str | None) -> None:
    """The reward autoencoder is an `AutoencoderTiny` folder or Hub repo (its config is read, no weights)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"--reward_vae_model_name_or_path {name_or_path} is not an AutoencoderTiny folder (no config.json)."
            )
        return
    from diffusers import AutoencoderTiny

    try:
        AutoencoderTiny.load_config(name_or_path, revision=revision)
    except Exception as error:
        raise FileNotFoundError(
            f"Could not read config.json of --reward_vae_model_name_or_path {name_or_path!r} (revision "
            f"{revision or 'main'}; {type(error).__name__}: {error}). Check the id, --reward_vae_revision and your "
            "network (HF_HUB_OFFLINE), or give a local AutoencoderTiny folder."
        ) from error


def check_student_init(config: DMDRConfig) -> None:
    """`--student_init_path` exists, holds safetensors, and fits `--training_mode` (and the LoRA rank)."""
    from .adapters import lora_rank_of_file, student_init_files

    kind, files = student_init_files(config.student_init_path)
    if kind == "lora" and config.training_mode != "lora":
        raise ValueError(
            f"--student_init_path {config.student_init_path} is a LoRA: it initialises a --training_mode lora "
            "student (or fuse it into a backbone first)."
        )
    if kind == "backbone" and config.training_mode != "full":
        raise ValueError(
            f"--student_init_path {config.student_init_path} is a full backbone: use --training_mode full (a LoRA "
            "student shares the teacher's weights, so it cannot start from other ones)."
        )
    if kind == "lora" and lora_rank_of_file(files[0]) != config.lora_rank:
        raise ValueError(
            f"--student_init_path {config.student_init_path} has LoRA rank {lora_rank_of_file(files[0])} but "
            f"--lora_rank is {config.lora_rank}: set --lora_rank {lora_rank_of_file(files[0])}."
        )


def check_backbone_channels(config: DMDRConfig, family: ModelFamily) -> None:
    """The teacher's backbone must take exactly the VAE's latent channels (a 9-channel inpainting UNet does not)."""
    source = config.pretrained_model_name_or_path
    backbone = read_component_config(source, family.backbone_name, config.revision)
    vae = read_component_config(source, "vae", config.revision)
    in_channels, latent_channels = family.config_latent_channels(backbone, vae)
    if in_channels is not None and in_channels != latent_channels:
        raise ValueError(
            f"--pretrained_model_name_or_path {source}: its {family.backbone_name} takes {in_channels} input channels "
            f"but the VAE's latents have {latent_channels}; this is an inpainting or image-conditioned model, which "
            "DMDR cannot distil as text-to-image. Use the base text-to-image checkpoint of the model."
        )


def check_output_dir(output_dir: str) -> None:
    """`--output_dir` is (or can be created as) a writable folder: probed by creating and removing a file."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output_dir {output_dir}: {existing} is a file, so the folder cannot be created.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"--output_dir {output_dir}: {existing} is not writable ({error.strerror}); choose a writable folder."
        ) from None
