"""`--sequential_reward_backward`: each reward's backward at once, one tower's graph alive at a time, same gradients."""

import weakref

import pytest
import torch

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.rewards import compute_reward_loss, compute_reward_loss_sequentially, load_rewards
from diffusers_dmdr.testing import build_tiny_reward


PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_tiny_reward("clip", tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def rewards(tiny_clip_dir):
    # Two trained rewards (hinge 0.7 and linear, different weights, one offloaded) and a monitored one (weight 0).
    return load_rewards(
        [
            f"clip:0.3:model={tiny_clip_dir}",
            f"clip:0.5:hinge=none:model={tiny_clip_dir}:offload=true:prompt_prefix=a photo of ",
            f"clip:0:model={tiny_clip_dir}",
        ],
        "cpu",
    )


class TinyGenerator(torch.nn.Module):
    """Latents -> images in [0, 1] through trainable weights: the student and the decode in one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, latents):
        return torch.sigmoid(self.conv(latents)).repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)


def generator_gradients(rewards, sequential: bool, micro_batches: int = 1):
    """The generator's gradients, the logged loss values and the scores of `micro_batches` accumulated backward
    passes of the reward loss (divided by `micro_batches`, as the trainer's backward does)."""
    generator = TinyGenerator()
    torch.manual_seed(1)
    latents = torch.randn(2 * micro_batches, 4, 8, 8)
    values, all_scores = [], []
    for index in range(micro_batches):
        images = generator(latents[2 * index : 2 * index + 2])
        if sequential:
            loss, scores = compute_reward_loss_sequentially(rewards, images, PROMPTS)
        else:
            loss, scores = compute_reward_loss(rewards, images, PROMPTS)
        (loss / micro_batches).backward()
        values.append(loss.item())
        all_scores.append({name: score.item() for name, score in scores.items()})
    return {name: p.grad.clone() for name, p in generator.named_parameters()}, values, all_scores


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sequential_backward_gives_the_same_gradients_losses_and_scores(rewards, micro_batches):
    joint_grads, joint_values, joint_scores = generator_gradients(rewards, False, micro_batches)
    split_grads, split_values, split_scores = generator_gradients(rewards, True, micro_batches)
    assert all(grad.abs().sum() > 0 for grad in joint_grads.values())
    for name, grad in joint_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-5, atol=1e-8)
    assert split_values == pytest.approx(joint_values, rel=1e-6, abs=0)
    assert split_scores == joint_scores
    assert set(split_scores[0]) == {"clip", "clip_2", "clip_3"}


def test_a_zero_weight_reward_is_monitored_only(rewards):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    monitored = [rewards[2]]
    loss, scores = compute_reward_loss_sequentially(monitored, images, PROMPTS)
    # No gradient and a zero loss, but a score.
    assert not loss.requires_grad and loss.item() == 0.0 and set(scores) == {"clip_3"}
    # Its weight-0 score does not change the trained rewards' gradient either.
    (with_monitor,) = torch.autograd.grad(compute_reward_loss_sequentially(rewards, images, PROMPTS)[0], images)
    (without,) = torch.autograd.grad(compute_reward_loss_sequentially(rewards[:2], images, PROMPTS)[0], images)
    torch.testing.assert_close(with_monitor, without, rtol=0, atol=0)


class SavedTensorWatch:
    """Weak references to what each reward's graph saves for its backward (its activations; parameters and the
    input images excluded), and which of the first reward's are still alive when the second reward starts."""

    def __init__(self, rewards, images):
        self.kept = set()
        for reward in rewards:
            self.kept |= {id(t) for t in reward.fn.parameters()} | {id(t) for t in reward.fn.buffers()}
        self.images = images
        self.first_reward_saved: list[weakref.ref] = []
        self.alive_when_second_started = None

    def pack(self, tensor):
        if id(tensor) not in self.kept and tensor.data_ptr() != self.images.data_ptr():
            if self.alive_when_second_started is None:
                self.first_reward_saved.append(weakref.ref(tensor))
        return tensor

    def wrap_second(self, reward):
        forward = reward.fn.forward

        def watched(images, prompts):
            self.alive_when_second_started = sum(ref() is not None for ref in self.first_reward_saved)
            return forward(images, prompts)

        reward.fn.forward = watched
        return forward


@pytest.mark.parametrize("sequential, first_graph_freed", [(True, True), (False, False)])
def test_the_first_towers_graph_is_freed_before_the_second_runs(rewards, sequential, first_graph_freed):
    images = torch.sigmoid(torch.randn(2, 3, 32, 32, requires_grad=True))
    watch = SavedTensorWatch(rewards[:2], images)
    original = watch.wrap_second(rewards[1])
    try:
        with torch.autograd.graph.saved_tensors_hooks(watch.pack, lambda tensor: tensor):
            compute = compute_reward_loss_sequentially if sequential else compute_reward_loss
            loss, _ = compute(rewards[:2], images, PROMPTS)
    finally:
        rewards[1].fn.forward = original
    assert len(watch.first_reward_saved) > 10  # the tower saved its activations
    # Sequential: every activation of the first tower is gone; the joint loss keeps them all until its backward.
    assert (watch.alive_when_second_started == 0) == first_graph_freed
    loss.backward()


def test_fp16_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--sequential_reward_backward runs the reward towers' backward outside fp16"):
        DMDRConfig(
            pretrained_model_name_or_path="teacher",
            train_prompts="prompts.txt",
            mixed_precision="fp16",
            sequential_reward_backward=True,
        )
    DMDRConfig(pretrained_model_name_or_path="teacher", train_prompts="prompts.txt", sequential_reward_backward=True)


def _student_gradient(teacher_dir, prompt_file, output_dir, reward_specs, **overrides):
    """The student's gradient and logs from one stage-2 generator loss on the trainer's first rollout."""
    from conftest import tiny_config

    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer
    from diffusers_dmdr.training_module import STUDENT_ROLE

    config = tiny_config(teacher_dir, prompt_file, output_dir, cold_start_steps=0, **overrides)
    teacher = get_family("sdxl").load_teacher(config.pretrained_model_name_or_path)
    prompts = ["a red cat", "a blue dog", "the number seven"]
    trainer = DMDRTrainer(config, teacher, prompts, rewards=load_rewards(reward_specs, "cpu"))
    with torch.no_grad():  # LoRA B starts at zero: give the student adapters a gradient path through A too
        for name, parameter in trainer.student_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    trainer.objective.before_update(STUDENT_ROLE, 0)
    (batch,) = trainer.objective.rollout(0, 0, trainer.prompt_sampler.batch(0), first_row=0, micro_batches=1)
    loss, logs = trainer.objective.generator_loss(batch, 0)
    parameters = list(trainer.unwrapped.parameters_of(STUDENT_ROLE))
    return torch.autograd.grad(loss, parameters, allow_unused=True), logs


def test_the_objectives_student_gradient_is_unchanged(tiny_teacher_dirs, prompt_file, tmp_path, tiny_clip_dir):
    specs = [f"clip:0.3:model={tiny_clip_dir}", f"clip:2.0:hinge=none:model={tiny_clip_dir}:offload=true"]
    joint, joint_logs = _student_gradient(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", specs)
    split, split_logs = _student_gradient(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", specs, sequential_reward_backward=True
    )
    assert any(grad is not None and grad.abs().sum() > 0 for grad in joint)
    for joint_grad, split_grad in zip(joint, split, strict=True):
        assert (joint_grad is None) == (split_grad is None)
        if joint_grad is not None:
            torch.testing.assert_close(split_grad, joint_grad, rtol=1e-5, atol=1e-7)
    for key in ("loss_rl", "reward/clip", "reward/clip_2", "loss_dmd"):
        assert split_logs[key] == pytest.approx(joint_logs[key], rel=1e-6, abs=1e-7), key


# --- the memory estimate: offloaded towers, one at a time ----------------------------------------------------------
def small_spec(num_rewards: int, **options):
    """SDXL's published spec with small CLIP towers (a ViT-H/14's layout at width 64) and the tiny decoder, 256 px."""
    from dataclasses import replace

    from diffusers_dmdr.memory_estimate import MemoryOptions, published_spec

    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, patch_size=14)
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    return replace(
        published_spec("sdxl", resolution=256),
        num_rewards=num_rewards,
        reward_vision_config=dict(vision, image_size=224, projection_dim=32),
        reward_text_config=dict(text, max_position_embeddings=77, projection_dim=32, vocab_size=1000),
        options=MemoryOptions(reward_decode="tiny", **options),
    )


def reward_phase_peak(spec) -> int:
    """The counted peak of the estimate's reward decode + towers with their backward (`memory_estimate._reward_loss`)."""
    from diffusers_dmdr.memory_estimate import (
        _autocast,
        _reward_loss,
        activation_peak,
        build_reward_decoder,
        build_reward_towers,
        fake_tensors,
        materialize,
    )

    decoder, towers = build_reward_decoder(spec), build_reward_towers(spec)
    with fake_tensors():
        for module in [decoder, *(t for tower in towers for t in tower.values() if t is not None)]:
            materialize(module)
        latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16).requires_grad_(True)
        prompt_ids = torch.zeros(1, 77, dtype=torch.long)

        def run():
            with _autocast():
                _reward_loss(spec, decoder, towers, latents, prompt_ids).backward()

        return activation_peak(run)[0]


def test_the_estimate_streams_one_tower_at_a_time():
    from diffusers_dmdr.memory_estimate import build_reward_towers, persistent_bytes

    one_tower = sum(p.numel() * p.element_size() for p in build_reward_towers(small_spec(1))[0]["vision"].parameters())
    joint = {n: reward_phase_peak(small_spec(n)) for n in (1, 3)}
    sequential = {n: reward_phase_peak(small_spec(n, sequential_reward_backward=True)) for n in (1, 3)}
    # Joint: every tower's activations are alive at the backward, so two more towers add two towers' activations.
    tower_activations = (joint[3] - joint[1]) / 2
    assert tower_activations > 0.2 * one_tower
    # Sequential: one tower's streamed weights (counted: offloaded weights are copied in) and activations at a time,
    # so more towers add next to nothing.
    assert sequential[1] > joint[1] + 0.9 * one_tower
    assert sequential[3] - sequential[1] < 0.1 * tower_activations
    # The towers leave the persistent bytes.
    assert "reward image towers" in persistent_bytes(small_spec(3))
    assert "reward image towers" not in persistent_bytes(small_spec(3, sequential_reward_backward=True))
    assert "reward text towers" not in persistent_bytes(small_spec(3, sequential_reward_backward=True))


def test_the_option_is_a_chooser_candidate_with_its_flags(tmp_path):
    from diffusers_dmdr.memory_estimate import CANDIDATE_OPTIONS, MemoryOptions, options_of_config

    options = MemoryOptions(reward_decode="tiny", cache_reward_text_features=True, sequential_reward_backward=True)
    position = CANDIDATE_OPTIONS.index(options)
    assert CANDIDATE_OPTIONS[position - 1] == replace_options(options, sequential_reward_backward=False)
    assert "--sequential_reward_backward" in options.flags() and "sequential backward" in options.describe()
    config = DMDRConfig(
        pretrained_model_name_or_path="teacher",
        train_prompts="prompts.txt",
        reward=["clip:offload=true", "hpsv2.1:offload=true"],
        sequential_reward_backward=True,
    )
    assert options_of_config(config).sequential_reward_backward
    # A reward left on the device: estimated as the joint backward (an over-estimate, never an under-estimate).
    config.reward = ["clip:offload=true", "hpsv2.1"]
    assert not options_of_config(config).sequential_reward_backward


def replace_options(options, **changes):
    from dataclasses import replace

    return replace(options, **changes)


def test_fp16_autocast_from_accelerates_own_config_is_refused_at_the_reward_step():
    """`--mixed_precision` unset takes accelerate's config, which the DMDR config cannot see: the objective checks
    the autocast it runs under."""
    from diffusers_dmdr.method.objective import _refuse_fp16_autocast

    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="use mixed precision bf16"):
        _refuse_fp16_autocast("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _refuse_fp16_autocast("cpu")
    _refuse_fp16_autocast("cpu")


def test_the_preflight_finds_the_published_sdxl_row():
    """The preflight's table has the SDXL row (tiny decode, cached text features, offloaded towers) under its own
    key: the same total as the full estimate at 1024 px, batch 1, and no towers in the persistent bytes."""
    import json
    from pathlib import Path

    from diffusers_dmdr.memory_estimate import GIB, MemoryOptions, published_spec, scaled_estimate

    options = MemoryOptions(reward_decode="tiny", cache_reward_text_features=True, sequential_reward_backward=True)
    scaled = scaled_estimate(published_spec("sdxl", options=options))
    assert scaled is not None and not any("tower" in name for name in scaled.persistent)
    rows = json.loads((Path(__file__).parents[1] / "docs" / "iteration_memory.json").read_text())["rows"]
    assert scaled.total_bytes == rows["sdxl-tiny-cached-offload-seq"]["total_bytes"] <= 12 * GIB
    # Without cached text features the towers stream their text towers too: not the same activation run.
    uncached = replace_options(options, cache_reward_text_features=False)
    assert scaled_estimate(published_spec("sdxl", options=uncached)) is None
