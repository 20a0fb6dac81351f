"""The DMDR recipe of the digit-pairs testbed, built in code so that it ships with the package.

`digits_recipe(testbed, output_dir)` gives the `DMDRConfig` values of `make demo`: a 4-step full student of the tiny
SDXL pairs teacher at 32 x 64, DMD cold start with DynaDG + DynaRS, then DMD + the pair-classifier reward, sized for a
2-core CPU. `examples/train_dmdr/configs/digits.yaml` is the same recipe for reading (a test keeps the two equal);
`write_recipe` writes the resolved copy that a training run reads.
"""

from pathlib import Path

import yaml

from .pairs import PAIR_HEIGHT, PAIR_WIDTH


REWARD_CLASS = "diffusers_dmdr.digits.reward.DigitPairReward"
# The reward without gradients of the GRPO / DPO variants: a scikit-learn classifier reading the two halves.
SCORER_CLASS = "diffusers_dmdr.digits.scorer.DigitPairScorer"
# The testbed-independent part of the recipe; `digits_recipe` adds the teacher, the prompts and the reward weights.
DIGITS_RECIPE = {
    "family": "sdxl",
    "resolution": PAIR_HEIGHT,
    "width": PAIR_WIDTH,
    "num_student_steps": 4,
    "student_timesteps": [999, 749, 499, 249],
    "backward_simulation": "sde",
    "training_mode": "full",
    "export_full_pipeline": True,
    "fake_lora_rank": 16,
    "fake_lora_alpha": 16,
    "init_lora_weights": "kaiming",
    "fake_score_lora_scale": 2.0,
    "real_score_lora_scale": 0.5,
    # The teacher's best setting on held-out pairs (docs/digits.md).
    "real_guidance_scale": 3.0,
    "guidance_scale_jitter": 0.5,
    # The paper's TTUR is 5 fake-score updates per generator update; here 3 measured better over three seeds (held-out
    # pair accuracy 0.677 against 0.631, FD 6.75 against 6.45) and makes a step a third cheaper (docs/digits.md).
    "update_ratio": 3,
    "dynamic_steps": 60,
    "renoise_beta_alpha": 4.0,
    "renoise_beta_beta": 1.5,
    "cold_start_steps": 60,
    # 440 steps of DMD + reward: the pair accuracy it buys grows with stage 2's length (0.556 after 100 steps, 0.66
    # after 440, one seed at TTUR 5), while DMD alone stays at 0.52-0.55 at every length (docs/digits.md).
    "max_train_steps": 500,
    "train_batch_size": 16,
    "learning_rate": 1.0e-4,
    "learning_rate_fake": 1.0e-4,
    "mixed_precision": "no",
    # log p(prompted pair) <= 0: a hinge would never switch off, so the reward loss is linear. The weight is small
    # because the DMD surrogate's per-sample gradient is divided by the sample's latent size (256 here) and the
    # reward's is not, and a swapped pair scores about -37 nats: weights 0.05 and up let the reward classifier be
    # hacked (docs/digits.md, "The demo on the pairs").
    "reward": [{"name": REWARD_CLASS, "weight": 0.01, "hinge": None}],
    "validation_prompts": ["a 3 to the left of a 7", "nine on the right and two on the left"],
    "validation_steps": 80,
    "checkpointing_steps": 80,
    "checkpoints_total_limit": 2,
    "report_to": "tensorboard",
    "seed": 0,
}


# Stage 2 of the GRPO / DPO variants (`make demo --rl grpo`): the same stage 1 and schedule as the ReFL recipe, groups of
# 4 rollouts (4 prompts x 4 noises per batch of 16), the scikit-learn pair scorer's probability as the only reward.
# The RL weights follow the DMDR authors' rule (the RL gradient about the DMD gradient's size when RL starts): measured
# on this testbed, the DMD gradient's norm is 2.6 (GRPO batch) / 4.4 (DPO pairs), GRPO's at weight 1 is 0.80 and DPO's
# at weight 1 and beta 100 is 311, hence 3 and 0.015 (docs/rl.md).
RL_RECIPES = {
    "grpo": {"rl": "grpo", "rl_group_size": 4, "rl_weight": 3.0},
    "dpo": {"rl": "dpo", "rl_group_size": 4, "rl_weight": 0.015, "rl_dpo_beta": 100.0},
}


def rl_overrides(rl: str, regularizer: str = "dmd") -> dict:
    """Recipe overrides that train stage 2 with `rl` (`grpo` or `dpo`) on the pair scorer, regularised by
    `regularizer` (`dmd`, `kl` or `none`); `refl` is the recipe itself."""
    if rl == "refl":
        return {}
    return {
        **RL_RECIPES[rl],
        "rl_regularizer": regularizer,
        "reward": [{"name": SCORER_CLASS, "weight": 1.0, "hinge": None}],
    }


def digits_recipe(testbed, output_dir: str | Path, overrides: dict | None = None) -> dict:
    """`DIGITS_RECIPE` with `testbed`'s teacher, training prompts and reward weights, exporting to `output_dir`.

    Args:
        testbed ([`DigitsTestbed`]): the built testbed.
        output_dir (`str` or `Path`): the run's `output_dir` (the exported student goes there).
        overrides (`dict`, *optional*): more config values; a `reward` list replaces the recipe's, and a spec of the
            pair reward without `model` gets the testbed's weights.
    """
    values = {key: value for key, value in DIGITS_RECIPE.items()}
    values["reward"] = [dict(spec) for spec in DIGITS_RECIPE["reward"]]
    values.update(
        pretrained_model_name_or_path=str(testbed.teacher_dir),
        train_prompts=str(testbed.prompts_file),
        output_dir=str(output_dir),
    )
    values.update(overrides or {})
    values["reward"] = [
        {**spec, "model": str(testbed.reward_weights)}
        if isinstance(spec, dict) and spec.get("name") == REWARD_CLASS and "model" not in spec
        else spec
        for spec in values.get("reward") or []
    ]
    return values


def write_recipe(testbed, run_dir: str | Path, output_dir: str | Path | None = None, overrides=None) -> Path:
    """Write `digits_recipe(...)` to `run_dir/digits_recipe.yaml` (the student exports to `output_dir`, by default
    `run_dir/student`) and return the file's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    values = digits_recipe(testbed, output_dir or run_dir / "student", overrides)
    path = run_dir / "digits_recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path
