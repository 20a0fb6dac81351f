"""Per-stage values of a DMDR run: which learning rates and batch size hold at a given generator step.

The released DMDR scripts run stage 2 (DMD + rewards) as a resumed run with its own generator / fake learning rates
and per-process batch size (paper-digest §3.2). Here one run switches to the stage-2 values at `cold_start_steps`,
and a resumed run past that step uses them too. Everything below is a pure function of the config and a counter, so
a run and its resume agree exactly.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class StageValues:
    """The values that hold during one stage: `stage` (1 or 2), the student and fake-score learning rates, and the
    prompts per process per iteration."""

    stage: int
    learning_rate: float
    learning_rate_fake: float
    train_batch_size: int


def stage_values(config, global_step: int) -> StageValues:
    r"""The values in force at generator step `k = global_step`.

    Stage 1 holds for `k < cold_start_steps`, stage 2 from `k >= cold_start_steps` on; each `stage2_*` field that is
    `None` keeps its stage-1 value.
    """
    if global_step < config.cold_start_steps:
        return StageValues(1, config.learning_rate, config.learning_rate_fake, config.train_batch_size)

    def pick(stage2_value, stage1_value):
        return stage1_value if stage2_value is None else stage2_value

    return StageValues(
        2,
        pick(config.stage2_learning_rate, config.learning_rate),
        pick(config.stage2_learning_rate_fake, config.learning_rate_fake),
        pick(config.stage2_train_batch_size, config.train_batch_size),
    )


def stage_two_start_iteration(cold_start_steps: int, update_ratio: int) -> int:
    r"""The first iteration of stage 2.

    Iteration `i` (one fake-score update each) belongs to generator step `k = floor(i / r)` for the update ratio `r`
    (the generator updates after iterations `r - 1, 2r - 1, ...`), so stage 2 starts at `i = r * cold_start_steps`.
    """
    return cold_start_steps * update_ratio
