"""Per-stage values: which learning rates / batch size hold at generator step k, the LR switch on a prepared
scheduler, and the prompt stream across a batch-size change."""

import pytest

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.data import PromptSampler
from diffusers_dmdr.method.stages import stage_two_start_iteration, stage_values


def config(**overrides):
    values = dict(
        pretrained_model_name_or_path="teacher",
        train_prompts="p.txt",
        max_train_steps=10,
        cold_start_steps=4,
        learning_rate=1e-6,
        learning_rate_fake=2e-8,
        train_batch_size=4,
    )
    return DMDRConfig(**{**values, **overrides})


def test_stage_values_switch_at_the_cold_start():
    run = config(stage2_learning_rate=1e-7, stage2_learning_rate_fake=5e-9, stage2_train_batch_size=2)
    assert stage_values(run, 3) == (stage_values(run, 0)) and stage_values(run, 3).stage == 1
    assert (stage_values(run, 3).learning_rate, stage_values(run, 3).train_batch_size) == (1e-6, 4)
    late = stage_values(run, 4)
    assert (late.stage, late.learning_rate, late.learning_rate_fake, late.train_batch_size) == (2, 1e-7, 5e-9, 2)
    # Unset stage-2 fields keep the stage-1 values.
    partial = stage_values(config(stage2_learning_rate=1e-7), 9)
    assert (partial.learning_rate, partial.learning_rate_fake, partial.train_batch_size) == (1e-7, 2e-8, 4)


@pytest.mark.parametrize(("cold_start_steps", "update_ratio"), [(2, 5), (0, 3), (3, 1), (1, 2)])
def test_stage_two_starts_at_the_first_iteration_of_the_cold_start_step(cold_start_steps, update_ratio):
    """The prompt sampler switches batch size at an iteration, the learning rates at a generator step: both must
    agree under the trainer's TTUR counting (a generator step after every `update_ratio`-th iteration)."""
    run = config(cold_start_steps=cold_start_steps)
    global_step, iteration = 0, 0
    while stage_values(run, global_step).stage == 1:
        iteration += 1
        global_step += iteration % update_ratio == 0
    assert stage_two_start_iteration(cold_start_steps, update_ratio) == iteration


def test_prompt_stream_continues_across_a_batch_change():
    prompts = [f"p{i}" for i in range(7)]
    # Two processes, batch 3 then 1 from iteration 2 on.
    samplers = [
        PromptSampler(prompts, 3, 0, rank, 2, stage2_batch_size=1, stage2_start_iteration=2) for rank in (0, 1)
    ]
    plain = PromptSampler(prompts, 1, 0, 0, 1)
    stream = [plain.batch(i)[0] for i in range(20)]
    seen = [prompt for iteration in range(5) for sampler in samplers for prompt in sampler.batch(iteration)]
    # Global positions: 2 iterations x 6, then 3 iterations x 2 = one unbroken run of the seeded permutation.
    assert seen == stream[:18]
    assert [len(samplers[0].batch(i)) for i in range(4)] == [3, 3, 1, 1]


def test_stage_two_fields_validate():
    with pytest.raises(ValueError, match="--stage2_learning_rate must be positive"):
        config(stage2_learning_rate=0.0)
