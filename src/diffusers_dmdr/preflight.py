"""Checks of a run's inputs that need no weights: they fail in seconds, with a message naming the fix."""

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import DMDRConfig, report_to_trackers
from .data import load_prompts
from .families import ModelFamily, detect_family, get_family, read_teacher_config
from .families.base import read_component_config, read_scheduler_config, read_vae_config, student_grid_for
from .hub_cache import hub_cache_kwargs, using_hub_cache_dir
from .memory_estimate import check_memory_budget, describe_run_estimate
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
    """Validate everything about `config` that can be checked before any weight is loaded; every Hub read goes
    through `--cache_dir`."""
    if config.cache_dir is not None and Path(config.cache_dir).expanduser().is_file():
        raise ValueError(f"--cache_dir {config.cache_dir} is a file; give the Hugging Face cache folder.")
    with using_hub_cache_dir(config.cache_dir):
        return _check_run_inputs(config)


def _check_run_inputs(config: DMDRConfig) -> RunPlan:
    from .rewards import check_recipe_import_paths, parse_reward_spec, resolve_reward_factory, validate_reward_specs
    from .rewards.core import reward_import_paths
    from .rewards.scores import is_score_reward

    # The engine the launch asked for (DeepSpeed is refused: see sharding.py).
    check_engine_supported()
    check_recipe_import_paths(config)  # first: the other checks import what the rewards name
    # 0. A local teacher is recorded by its absolute path, so the run's recipe (and its checkpoints') resolve from any
    # folder (`dmdr-export`, `evaluate --teacher auto`); only what is published is redacted.
    local_teacher = Path(config.pretrained_model_name_or_path).expanduser()
    if local_teacher.is_dir():
        config.pretrained_model_name_or_path = str(local_teacher.resolve())
    if (
        config.pretrained_vae_model_name_or_path
        and Path(config.pretrained_vae_model_name_or_path).expanduser().is_dir()
    ):
        config.pretrained_vae_model_name_or_path = str(
            Path(config.pretrained_vae_model_name_or_path).expanduser().resolve()
        )
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
    family.check_run_config(config)  # e.g. Wan's frame count against its VAE's temporal factor

    # 2. Resolution against the VAE's spatial factor. Non-square training is wired through the UNet families' size
    # conditioning only; the flow transformers' grids (dynamic shift) and packing assume a square image.
    if config.width not in (None, config.resolution) and not family.supports_non_square:
        raise ValueError(
            f"--width {config.width} (non-square training) is supported for SDXL, SD1.5 and Wan teachers; this teacher is "
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
    if config.pretrained_vae_model_name_or_path:
        check_teacher_vae(config, family)

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
        if config.student_timesteps:
            raise ValueError(f"--student_timesteps: {error}") from error
        # The default grid is the family's, not the user's: say so, and how to replace it.
        raise ValueError(
            f"The {family.name} default {config.num_student_steps}-step grid is unusable ({error}); give "
            "--student_timesteps (or --shift for a flow family)."
        ) from error

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
    if config.reward_tilt and config.train_batch_size < 2:
        raise ValueError(
            "--reward_tilt z-scores the rewards within each micro-batch of --train_batch_size samples, and a "
            "micro-batch of 1 has nothing to normalise against (accumulation does not help): use --train_batch_size 2 "
            "or more."
        )
    if config.dmd_loss_weight == 0 and not reward_specs:
        raise ValueError("--dmd_loss_weight 0 with no --reward leaves nothing to train the student on.")

    if config.reward_vae_model_name_or_path:
        check_reward_vae(config.reward_vae_model_name_or_path, config.reward_vae_revision)
    if (config.reward_vae_gradient_checkpointing or config.reward_vae_tile_size) and not (
        config.reward_vae_model_name_or_path
    ):
        check_reward_vae_memory_options(config)
    elif config.reward_vae_tile_size:
        raise ValueError(
            "--reward_vae_tile_size tiles the teacher's own VAE; a tiny reward autoencoder "
            "(--reward_vae_model_name_or_path) is decoded whole: drop one of the two."
        )

    # 4b. Student initialisation: the file kind fits the training mode, a LoRA fits the configured rank.
    if config.student_init_path:
        check_student_init(config, family)

    # 5. Optional dependencies asked for.
    # (`all` means "every installed tracker" to accelerate, so it needs none in particular.)
    for tracker in report_to_trackers(config.report_to):
        if tracker != "all" and not _tracker_installed(tracker):
            raise ImportError(
                f"--report_to {config.report_to} needs {tracker}: `pip install {tracker}`, or pass --report_to none."
            )
    check_mixed_precision(config.mixed_precision)
    check_base_quantization(config)
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "--use_8bit_adam needs bitsandbytes: `pip install diffusers-dmdr[bnb]`, or drop --use_8bit_adam."
        )

    # 6. Resume target.
    if config.resume_from_checkpoint not in (None, "latest"):
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir() and not (Path(config.output_dir) / config.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder.")

    # 6a. The checkpoint a resume will take (complete, hashes matching, finite weights) and its recipe.
    if config.resume_from_checkpoint:
        from .checkpointing import CheckpointError, resolve_checkpoint

        try:
            checkpoint = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, check_weights=True)
        except CheckpointError as error:
            raise ValueError(str(error)) from None
        if checkpoint is not None:
            check_resume_recipe(config, checkpoint, family.name, list(timesteps))

    # 6b. Where checkpoints and the export go, and the prompt-embedding cache.
    check_output_dir(config.output_dir)
    if config.cache_prompt_embeds:
        from .prompt_cache import DEFAULT_CACHE_DIR

        folder = config.prompt_embeds_cache_dir or str(DEFAULT_CACHE_DIR)
        check_writable_folder("--prompt_embeds_cache_dir", folder, "the prompt-embedding cache is written there")

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
    # 9. With --max_memory_gib: a whole iteration, activations included, estimated on fake tensors against the budget;
    #    without it, the estimate printed when one is at hand in seconds (cached, or the published table scaled).
    if config.max_memory_gib is not None:
        logger.info(check_memory_budget(config, family))
    else:
        logger.info(describe_run_estimate(config, family))
    return RunPlan(family, list(timesteps), prompts, reward_specs, eval_specs, memory_plan)


def check_reward_vae_memory_options(config) -> None:
    """`--reward_vae_gradient_checkpointing` / `--reward_vae_tile_size` with the teacher's own VAE: its diffusers
    class must support gradient checkpointing (Qwen-Image's and Wan's autoencoders do not) or a tiled decode this
    project drives, read from `vae/config.json` before any weight loads."""
    import diffusers

    from .families.base import read_component_config
    from .reward_decode import TILED_REWARD_VAES

    tile = config.reward_vae_tile_size
    if tile is not None and (tile <= 0 or tile % 64):
        raise ValueError(f"--reward_vae_tile_size must be a positive multiple of 64 pixels, got {tile}.")

    try:
        class_name = read_component_config(config.pretrained_model_name_or_path, "vae", config.revision)["_class_name"]
    except (OSError, KeyError, ValueError):
        return  # no readable VAE config: the teacher's own loading reports it
    if tile is not None and class_name not in TILED_REWARD_VAES:
        raise ValueError(
            f"--reward_vae_tile_size: the teacher's {class_name} is not a tiled autoencoder this project drives "
            f"({', '.join(TILED_REWARD_VAES)}); drop the flag."
        )
    vae_class = getattr(diffusers, class_name, None)
    if not config.reward_vae_gradient_checkpointing:
        return
    if vae_class is not None and not getattr(vae_class, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"--reward_vae_gradient_checkpointing: the teacher's {class_name} has no gradient checkpointing in "
            "diffusers; drop the flag or decode the rewards with a tiny autoencoder (--reward_vae_model_name_or_path)."
        )


def _tracker_installed(name: str) -> bool:
    if name == "tensorboard":
        # accelerate's tensorboard tracker runs on either package.
        return any(importlib.util.find_spec(module) is not None for module in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(name) is not None


def check_mixed_precision(mixed_precision: str | None) -> None:
    """`--mixed_precision fp16` needs an accelerator: accelerate refuses it on a CPU (bf16 autocast runs there)."""
    import torch

    if mixed_precision != "fp16":
        return
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    devices = ("cuda", "xpu", "npu", "mlu", "musa", "hpu", "mps")
    has_accelerator = any(
        getattr(torch, name, None) is not None and getattr(torch, name).is_available()
        for name in devices
        if hasattr(getattr(torch, name, None), "is_available")
    )
    if on_cpu or not has_accelerator:
        raise ValueError(
            "--mixed_precision fp16 needs a GPU and this run is on the CPU (the SDXL recipes set it): pass "
            "--mixed_precision no (or bf16)."
        )


def _on_cuda() -> bool:
    """The run will be on a CUDA GPU: one is visible and the launch did not ask for the CPU."""
    import torch

    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return not on_cpu and torch.cuda.is_available()


def check_base_quantization(config: DMDRConfig) -> None:
    """`--base_quantization`: what a quantized frozen base can and cannot do, refused before any weight loads.

    - LoRA mode only: in full mode the student is a trainable copy of the base;
    - not with FSDP2: accelerate's `fully_shard` would have to shard bitsandbytes' and torchao's quantized tensor
      types, which this project has not verified (train on one GPU, or data parallel, instead);
    - bitsandbytes needs CUDA (diffusers' bitsandbytes quantizer refuses a machine without a GPU); torchao runs on
      the CPU too;
    - the backend's package is installed (`diffusers-dmdr[bnb]` / `diffusers-dmdr[quant]`).
    """
    scheme = config.base_quantization
    if scheme == "none":
        return
    if config.training_mode == "full":
        raise ValueError(
            f"--base_quantization {scheme} needs --training_mode lora: in full mode the student is a trainable copy "
            "of the base, which cannot be quantized. Use --training_mode lora, or --base_quantization none."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            f"--base_quantization {scheme} is not supported under FSDP2 (sharding quantized weights is unverified "
            "here): launch on one GPU or with data parallel (multi_gpu_ddp.yaml), or use --base_quantization none."
        )
    if scheme.startswith("bnb_"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                f"--base_quantization {scheme} needs bitsandbytes: `pip install diffusers-dmdr[bnb]`, or use "
                "--base_quantization torchao_int8."
            )
        if not _on_cuda():
            raise ValueError(
                f"--base_quantization {scheme} needs a CUDA GPU (bitsandbytes quantization) and this run is on the "
                "CPU: use --base_quantization torchao_int8, or none."
            )
    elif scheme == "torchao_int8" and not _torchao_usable():
        raise ImportError(
            "--base_quantization torchao_int8 needs torchao >= 0.15: `pip install diffusers-dmdr[quant]`, or use "
            "--base_quantization none."
        )


def _torchao_usable() -> bool:
    """torchao is installed at a version diffusers' `TorchAoConfig` accepts (>= 0.15; read from the metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("torchao")) >= Version("0.15")
    except PackageNotFoundError:
        return False


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
        AutoencoderTiny.load_config(name_or_path, revision=revision, **hub_cache_kwargs())
    except Exception as error:
        raise FileNotFoundError(
            f"Could not read config.json of --reward_vae_model_name_or_path {name_or_path!r} (revision "
            f"{revision or 'main'}; {type(error).__name__}: {error}). Check the id, --reward_vae_revision and your "
            "network (HF_HUB_OFFLINE), or give a local AutoencoderTiny folder."
        ) from error


def check_student_init(config: DMDRConfig, family: ModelFamily) -> None:
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
    check_student_init_fits_teacher(config, family, kind, files)


def check_student_init_fits_teacher(config: DMDRConfig, family: ModelFamily, kind: str, files: list[Path]) -> None:
    """Every tensor of `--student_init_path` has a place of its shape in the teacher's backbone (built from its
    config on the meta device: no weights), and a backbone leaves none out: a file of another family or size fails
    here, not after the teacher loads. Only safetensors headers are read."""
    import diffusers
    import torch
    from safetensors import safe_open

    from .adapters import _LORA_KEY_PREFIXES as LORA_KEY_PREFIXES
    from .adapters import STUDENT_ADAPTER

    backbone_config = read_component_config(
        config.pretrained_model_name_or_path, family.backbone_name, config.revision
    )
    backbone_class = getattr(diffusers, family.backbone_class_name)
    with torch.device("meta"):
        teacher_shapes = {
            name: tuple(tensor.shape)
            for name, tensor in backbone_class.from_config(backbone_config).state_dict().items()
        }
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    source, what = config.student_init_path, f"the teacher's {family.backbone_class_name} ({family.name})"
    problems = []
    if kind == "backbone":
        unexpected = sorted(set(shapes) - set(teacher_shapes))
        missing = sorted(set(teacher_shapes) - set(shapes))
        mismatched = [k for k in sorted(set(shapes) & set(teacher_shapes)) if shapes[k] != teacher_shapes[k]]
        problems += [f"{len(unexpected)} unknown key(s) such as {unexpected[0]}"] if unexpected else []
        problems += [f"{len(missing)} missing key(s) such as {missing[0]}"] if missing else []
        if mismatched:
            key = mismatched[0]
            problems.append(
                f"{len(mismatched)} key(s) of another shape such as {key} {list(shapes[key])} (teacher: "
                f"{list(teacher_shapes[key])})"
            )
    else:
        for key, shape in shapes.items():
            name = key
            for prefix in LORA_KEY_PREFIXES:
                name = name.removeprefix(prefix)
            name = name.replace(f".{STUDENT_ADAPTER}.", ".")
            for part, dimension in ((".lora_A.", 1), (".lora_B.", 0)):
                if part not in name:
                    continue
                base = name.split(part)[0] + ".weight"
                if base not in teacher_shapes:
                    problems.append(f"{key} adapts {base.removesuffix('.weight')}, which the teacher does not have")
                elif teacher_shapes[base][dimension] != shape[dimension]:
                    problems.append(
                        f"{key} has shape {list(shape)}, which does not fit {base} {list(teacher_shapes[base])}"
                    )
            if problems:
                break
    if problems:
        raise ValueError(
            f"--student_init_path {source} does not fit {what}: {'; '.join(problems)}. Give a student of this "
            "teacher's family and size."
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


# VAE config keys that define its latent space: another VAE for the teacher must agree on each one it sets.
VAE_LATENT_SPACE_KEYS = (
    "latent_channels",
    "z_dim",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "scale_factor_spatial",
    "scale_factor_temporal",
)


def check_teacher_vae(config: DMDRConfig, family: ModelFamily) -> None:
    """`--pretrained_vae_model_name_or_path` is a VAE of the teacher VAE's class with the same latent space (its
    configs only), and a local folder holds safetensors weights for `--variant`, which applies to it too."""
    flag, name = "--pretrained_vae_model_name_or_path", config.pretrained_vae_model_name_or_path
    vae_config = read_vae_config(name, config.revision)
    teacher_vae = read_component_config(config.pretrained_model_name_or_path, "vae", config.revision)
    vae_class, teacher_class = vae_config.get("_class_name"), teacher_vae.get("_class_name")
    if vae_class != teacher_class:
        raise ValueError(
            f"{flag} {name} is a {vae_class} but the teacher's VAE is a {teacher_class}: give a VAE of the teacher's "
            "class and latent space."
        )
    # A key a config leaves out has the class's default (configs saved by older diffusers omit `scaling_factor`).
    defaults = _init_defaults(vae_class)
    vae_config, teacher_vae = {**defaults, **vae_config}, {**defaults, **teacher_vae}
    differences = [
        f"{key} {vae_config.get(key)} (teacher's VAE: {teacher_vae.get(key)})"
        for key in VAE_LATENT_SPACE_KEYS
        if vae_config.get(key) != teacher_vae.get(key)
    ]
    if len(vae_config.get("block_out_channels", [])) != len(teacher_vae.get("block_out_channels", [])):
        differences.append(
            f"spatial factor {2 ** (len(vae_config.get('block_out_channels', [0])) - 1)} (teacher's VAE: "
            f"{2 ** (len(teacher_vae.get('block_out_channels', [0])) - 1)})"
        )
    if differences:
        raise ValueError(
            f"{flag} {name} has another latent space than the teacher's VAE: {'; '.join(differences)}. DMDR trains "
            "in the teacher's latents, so the VAE must share them (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL)."
        )
    folder = Path(name).expanduser()
    if folder.is_dir():
        suffix = f".{config.variant}" if config.variant else ""
        weights = [
            f"diffusion_pytorch_model{suffix}.safetensors",
            f"diffusion_pytorch_model.safetensors.index{suffix}.json",
        ]
        if not any((folder / file).is_file() for file in weights):
            fix = (
                f"--variant {config.variant} applies to the VAE too, as in diffusers' SDXL scripts: save the VAE with "
                f"`save_pretrained(folder, variant={config.variant!r})`, or drop --variant"
                if config.variant
                else "save it with `save_pretrained(folder)` (only safetensors are loaded)"
            )
            raise FileNotFoundError(f"{flag} {name} has no {weights[0]}: {fix}.")


def _init_defaults(class_name: str | None) -> dict:
    """The keyword defaults of a diffusers class's `__init__` (its config values when a config omits them); `{}` for
    a name diffusers does not have."""
    import inspect

    import diffusers

    model_class = getattr(diffusers, str(class_name), None)
    if not isinstance(model_class, type):
        return {}
    parameters = inspect.signature(model_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def check_output_dir(output_dir: str) -> None:
    """`--output_dir` is (or can be created as) a writable folder: probed by creating and removing a file."""
    check_writable_folder("--output_dir", output_dir, "choose a writable folder")


def check_writable_folder(flag: str, folder: str, why: str) -> None:
    """`folder` is (or can be created as) a writable folder: probed by creating and removing a file."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {folder} is a file; give a folder (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, so the folder cannot be created.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {folder}: {existing} is not writable ({error.strerror}); {why}.") from None


# Fields a resume cannot change: they shape the trained weights or what the student is (refused in one line).
STRUCTURAL_FIELDS = (
    "training_mode",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "fake_lora_rank",
    "fake_lora_alpha",
    "fake_lora_target_modules",
    "num_student_steps",
    "use_8bit_adam",
    # In LoRA mode the student is base + LoRA: another base (quantized or not) is another student.
    "base_quantization",
)
# Fields a resume may change, with a warning: the run continues, but not as the uninterrupted run would.
SCHEDULE_FIELDS = (
    "train_batch_size",
    "gradient_accumulation_steps",
    "stage2_train_batch_size",
    "max_train_steps",
    "cold_start_steps",
    "dynamic_steps",
    "update_ratio",
    "lr_scheduler",
    "lr_warmup_steps",
    "learning_rate",
    "learning_rate_fake",
    "stage2_learning_rate",
    "stage2_learning_rate_fake",
    "seed",
    "resolution",
    "width",
    "lora_dropout",
    "pretrained_vae_model_name_or_path",
)


def _flag_value(value) -> str:
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    return str(value)


def check_resume_recipe(config: DMDRConfig, checkpoint: Path, family: str, student_timesteps: list[float]) -> None:
    """Compare the run with the recipe (`dmdr_config.yaml`) and run facts of the checkpoint it resumes.

    A structural change (the family, `--training_mode`, LoRA ranks/alphas/targets, the student grid, the optimizer
    kind) is refused in one line naming the flag and the checkpoint's value; batch, accumulation, process count and
    schedule changes are allowed with one warning. Stage boundaries the config derived from `--max_train_steps`
    (`cold_start_steps`, `dynamic_steps` left unset) keep the checkpoint's values, so a longer run does not move the
    stages of a run under way.
    """
    import yaml

    from .checkpointing import CONFIG_FILE, read_run_facts

    recipe_file = checkpoint / CONFIG_FILE
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        logger.warning(f"{recipe_file} is unreadable ({error}); the resumed run's recipe cannot be compared.")
        return
    if not isinstance(recipe, dict):
        logger.warning(f"{recipe_file} holds no recipe; the resumed run's recipe cannot be compared.")
        return
    facts = read_run_facts(checkpoint)

    def refuse(flag: str, current, recorded) -> None:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: {flag} {_flag_value(current)} differs from the checkpoint's "
            f"{flag} {_flag_value(recorded)}, which shapes its weights; resume with {flag} {_flag_value(recorded)}, "
            "or start a new run in another --output_dir."
        )

    recorded_family = facts.get("family") or (recipe.get("family") if recipe.get("family") != "auto" else None)
    if recorded_family and recorded_family != family:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the teacher is a {family} pipeline but the checkpoint was trained "
            f"from a {recorded_family} teacher (--pretrained_model_name_or_path "
            f"{recipe.get('pretrained_model_name_or_path')}); resume with that teacher, or start a new run in another "
            "--output_dir."
        )
    for name in STRUCTURAL_FIELDS:
        if name in recipe and recipe[name] != getattr(config, name):
            refuse(f"--{name}", getattr(config, name), recipe[name])
    recorded_grid = facts.get("student_timesteps")
    if recorded_grid is not None and [float(t) for t in recorded_grid] != [float(t) for t in student_timesteps]:
        refuse("--student_timesteps", student_timesteps, recorded_grid)

    # Derived stage boundaries stay where the run under way put them.
    for name in sorted(getattr(config, "derived_fields", ())):
        recorded = recipe.get(name)
        if isinstance(recorded, int) and recorded != getattr(config, name) and recorded <= config.max_train_steps:
            logger.info(f"Resuming {checkpoint}: keeping its --{name} {recorded} (derived from its run length).")
            setattr(config, name, recorded)

    changes = [
        f"--{name} {_flag_value(getattr(config, name))} (checkpoint: {_flag_value(recipe[name])})"
        for name in SCHEDULE_FIELDS
        if name in recipe and recipe[name] != getattr(config, name)
    ]
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if "num_processes" in facts and facts["num_processes"] != num_processes:
        changes.append(f"{num_processes} processes (checkpoint: {facts['num_processes']})")
    if changes:
        logger.warning(
            f"Resuming {checkpoint} with a changed recipe: {', '.join(changes)}. The run continues, but the batches, "
            "stages or learning rates differ from the run that wrote the checkpoint (an exact resume needs the "
            "same values)."
        )
