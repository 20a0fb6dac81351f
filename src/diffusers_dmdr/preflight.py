"""Checks of a run's inputs that need no weights: they fail in seconds, with a message naming the fix."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .config import DMDRConfig
from .data import load_prompts
from .families import ModelFamily, detect_family, get_family, read_teacher_config
from .memory_plan import MemoryPlan, memory_plan_for
from .pipelines.scheduling_dmdr import DMDRScheduler


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
    from .rewards import parse_reward_spec, validate_reward_specs

    # 1. Teacher: the folder or Hub id exists and is a supported family.
    model_index = read_teacher_config(config.pretrained_model_name_or_path, config.revision)
    detected = detect_family(model_index, config.pretrained_model_name_or_path)
    if config.family not in ("auto", detected):
        raise ValueError(
            f"--family {config.family} does not match the teacher, which is a {detected} pipeline; "
            "drop --family or pass --family auto."
        )
    family = get_family(detected)

    # 2. Resolution against the VAE's spatial factor.
    factor = family.vae_scale_factor(config.pretrained_model_name_or_path, config.revision)
    if config.resolution % factor:
        lower = max(factor, config.resolution // factor * factor)
        raise ValueError(
            f"--resolution {config.resolution} is not divisible by the VAE's factor {factor}; use e.g. {lower} or "
            f"{lower + factor}."
        )

    # 3. Student grid: the scheduler validates range and order.
    timesteps = config.student_timesteps or family.default_student_timesteps(config.num_student_steps, config.shift)
    if len(timesteps) != config.num_student_steps:
        raise ValueError(f"{len(timesteps)} student timesteps for --num_student_steps {config.num_student_steps}.")
    try:
        DMDRScheduler(prediction_type="flow" if family.is_flow else "epsilon", training_timesteps=timesteps)
    except ValueError as error:
        raise ValueError(f"--student_timesteps: {error}") from error

    # 4. Rewards: names or import paths resolve, local model files exist.
    reward_specs = [parse_reward_spec(text) for text in config.reward]
    eval_specs = [parse_reward_spec(text) for text in config.eval_reward]
    validate_reward_specs(reward_specs + eval_specs)
    if config.reward_tilt and not reward_specs:
        raise ValueError("--reward_tilt weights DMD by a reward: give at least one --reward.")
    if config.dmd_loss_weight == 0 and not reward_specs:
        raise ValueError("--dmd_loss_weight 0 with no --reward leaves nothing to train the student on.")

    reward_vae = config.reward_vae_model_name_or_path
    if reward_vae and (Path(reward_vae).exists() or reward_vae.startswith((".", "/", "~"))):
        if not (Path(reward_vae).expanduser() / "config.json").is_file():
            raise FileNotFoundError(
                f"--reward_vae_model_name_or_path {reward_vae} is not an AutoencoderTiny folder (no config.json)."
            )

    # 5. Optional dependencies asked for.
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "--use_8bit_adam needs bitsandbytes: `pip install diffusers-dmdr[bnb]`, or drop --use_8bit_adam."
        )

    # 6. Resume target.
    if config.resume_from_checkpoint not in (None, "latest"):
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir() and not (Path(config.output_dir) / config.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no such folder.")

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
