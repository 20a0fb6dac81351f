"""Distil a diffusers text-to-image teacher into a few-step student with DMDR: the training command line.

    accelerate launch -m diffusers_dmdr.train --config examples/train_dmdr/configs/sdxl_4step.yaml \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --train_prompts prompts.txt

Installed as the `dmdr-train` console script; `examples/train_dmdr/train.py` is the same program.

Flow: parse -> check inputs (no weights yet) -> load the teacher and rewards -> DMDRTrainer(...).train() -> export.
"""

import logging
import sys
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.cli import DEBUG_HELP, is_checked_input_error, one_line, run_entry_point
from diffusers_dmdr.config import USER_INPUT_ERRORS
from diffusers_dmdr.export import recover_interrupted_export
from diffusers_dmdr.hub_cache import hub_cache_kwargs, using_hub_cache_dir
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.rewards import load_rewards, reward_names_epilog
from diffusers_dmdr.trainer import DMDRTrainer, create_accelerator, weight_dtype_of


logger = get_logger(__name__)
# The name `--help` and the error lines give the program (`accelerate launch -m diffusers_dmdr.train` runs the same).
PROGRAM = "dmdr-train"


def parse_and_check(argv: list[str] | None = None):
    """Parse the command line and check every input before any weight loads. A bad input (one of the project's
    `USER_INPUT_ERRORS`) prints one message that names the fix (no traceback) and exits with status 2, like an
    argparse error."""
    try:
        config = DMDRConfig.parse_args(argv, epilog=f"{reward_names_epilog()}\n\n--debug: {DEBUG_HELP}.", prog=PROGRAM)
        plan = check_run_inputs(config)
    except USER_INPUT_ERRORS as error:
        if not is_checked_input_error(error):
            raise
        print(one_line(PROGRAM, error), file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    return config, plan


def main(argv: list[str] | None = None) -> None:
    """Train (and export) as the command line asks; the project's errors end as one line (`cli.run_entry_point`)."""
    run_entry_point(PROGRAM, _train, argv)


# Without --validation_prompts, this many training prompts (spread over the file) are sampled for the validation
# grids, the export's samples.png and the card.
NUM_DEFAULT_VALIDATION_PROMPTS = 4


def default_validation_prompts(prompts: list[str], count: int = NUM_DEFAULT_VALIDATION_PROMPTS) -> list[str]:
    """`count` training prompts evenly spread over `prompts` (first one included), without repeats."""
    number = min(count, len(prompts))
    return list(dict.fromkeys(prompts[index * len(prompts) // number] for index in range(number)))


def _train(argv: list[str]) -> None:
    config, plan = parse_and_check(argv)
    # Every Hub read from here on (teacher, VAE, rewards, reward autoencoder, the export) uses --cache_dir.
    with using_hub_cache_dir(config.cache_dir):
        _train_checked(config, plan)


def _train_checked(config: DMDRConfig, plan) -> None:
    accelerator = create_accelerator(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed)
    if not config.validation_prompts:
        config.validation_prompts = default_validation_prompts(plan.prompts)
        logger.info(f"No --validation_prompts: the grids and the card sample {config.validation_prompts}")
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        config.save_yaml(Path(config.output_dir) / "dmdr_config.yaml")
        # An export into this folder that a kill interrupted is finished or removed now, not at the run's end.
        recover_interrupted_export(config.output_dir)
    logger.info(f"{plan.family.name} teacher, student timesteps {plan.student_timesteps}, {len(plan.prompts)} prompts")
    if plan.memory_plan is not None:
        logger.info("\n" + plan.memory_plan.format_table())

    # Loaded once, directly in the training dtype; the export reuses these components.
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    teacher = plan.family.load_run_teacher(config, weight_dtype)
    # Frozen reward models run in the frozen weights' dtype (a spec's `precision=` overrides it). Reward
    # back-propagation probes each reward's gradient; GRPO and DPO only need scores.
    rewards = load_rewards(plan.reward_specs, accelerator.device, dtype=weight_dtype, for_training=config.rl == "refl")
    eval_rewards = load_rewards(plan.eval_reward_specs, accelerator.device, dtype=weight_dtype, for_training=False)
    reward_vae = None
    if config.reward_vae_model_name_or_path:
        from diffusers import AutoencoderTiny

        reward_vae = AutoencoderTiny.from_pretrained(
            config.reward_vae_model_name_or_path, revision=config.reward_vae_revision, **hub_cache_kwargs()
        )
    trainer = DMDRTrainer(
        config, teacher, plan.prompts, rewards, eval_rewards, accelerator=accelerator, reward_vae=reward_vae
    )
    trainer.train()

    from diffusers_dmdr.export import export_from_trainer

    # Every process takes part: sharded engines gather the student's weights collectively.
    export_dir = export_from_trainer(trainer)
    if export_dir is not None:
        logger.info(f"Exported the student pipeline to {export_dir}")
    accelerator.end_training()


def cli() -> None:
    """The `dmdr-train` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
