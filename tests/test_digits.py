"""The digits testbed on reduced settings: data, teacher build and reload, reward gradient, metrics vs references."""

import importlib

import numpy as np
import pytest
import torch

from diffusers_dmdr.digits import (
    DigitClassifierReward,
    DigitsBuildSettings,
    EvalDigitNet,
    RewardDigitNet,
    all_prompts,
    build_testbed,
    evaluate_digits,
    frechet_distance,
    frechet_distance_from_moments,
    knn_precision_recall,
    load_eval_classifier,
    mean_pairwise_distance,
    parse_digit,
    per_prompt_diversity,
    sample_digits,
    split_indices,
    write_prompts_file,
)
from diffusers_dmdr.digits.teacher import DIGITS_MAX_LENGTH, digits_tokenizer


# Every budget cut to a couple of steps: the build's code paths, not its quality.
TINY_SETTINGS = DigitsBuildSettings(
    vae_steps=2,
    unet_steps=2,
    reward_steps=2,
    eval_steps=2,
    gate_num_per_digit=1,
    gate_num_inference_steps=2,
)


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory):
    torch.manual_seed(0)
    return build_testbed(tmp_path_factory.mktemp("digits-cache"), TINY_SETTINGS, progress=False)


# ---------------------------------------------------------------------------------------------- data and prompts


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [("a handwritten digit seven", 7), ("the number 0", 0), ("Handwritten NINE", 9), ("a drawing of the digit 4", 4)],
)
def test_parse_digit(prompt, digit):
    assert parse_digit(prompt) == digit


def test_parse_digit_rejects_a_prompt_without_digit():
    with pytest.raises(ValueError, match="names no digit"):
        parse_digit("a handwritten letter")


def test_prompts_file_and_tokenizer(tmp_path):
    path = write_prompts_file(tmp_path / "prompts.txt", repeats=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * len(all_prompts()) == 80
    assert sorted({parse_digit(line) for line in lines}) == list(range(10))
    tokenizer = digits_tokenizer()
    for prompt in all_prompts():
        tokens = tokenizer.tokenize(prompt)
        # Word-level: one token per word, and the whole prompt fits with BOS/EOS.
        assert len(tokens) == len(prompt.split()) <= DIGITS_MAX_LENGTH - 2, tokens


def test_splits_are_disjoint_and_stratified():
    labels = torch.arange(10).repeat_interleave(100)
    splits = split_indices(labels)
    merged = torch.cat(list(splits.values()))
    assert len(merged) == len(labels) and len(merged.unique()) == len(labels)
    for index in splits.values():
        assert torch.bincount(labels[index], minlength=10).unique().numel() == 1


# ---------------------------------------------------------------------------------------------- teacher and sampling


def test_teacher_builds_saves_and_loads_as_sdxl(tiny_testbed, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    report = tiny_testbed.report
    assert tiny_testbed.prompts_file.read_text().splitlines() == all_prompts()
    assert set(report["teacher_gate"]) >= {"accuracy", "fd", "precision", "recall", "diversity"}
    assert sum(report["split_sizes"].values()) == 1797

    pipeline = DiffusionPipeline.from_pretrained(tiny_testbed.teacher_dir)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    assert vae_factor == 4 and report["resolution"] % vae_factor == 0
    # The reloaded word-level tokenizer still splits prompts into whole words.
    assert pipeline.tokenizer_2.tokenize("a handwritten digit seven") == [
        "a</w>",
        "handwritten</w>",
        "digit</w>",
        "seven</w>",
    ]

    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        ["the number 3", "handwritten five"],
        num_inference_steps=2,
        guidance_scale=4.0,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()

    # A second build with the same settings reuses the cache.
    again = build_testbed(tiny_testbed.root.parent, TINY_SETTINGS, progress=False)
    assert again.root == tiny_testbed.root and again.report["seconds"] == report["seconds"]


def test_sample_digits_is_seeded_per_sample(tiny_testbed):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_testbed.teacher_dir)
    kwargs = {"num_per_digit": 1, "num_inference_steps": 2, "guidance_scale": 3.0, "progress": False}
    whole = sample_digits(pipeline, batch_size=10, **kwargs)
    chunked = sample_digits(pipeline, batch_size=3, **kwargs)
    assert whole.images.shape == (10, 3, 32, 32)
    assert whole.images.min() >= 0 and whole.images.max() <= 1
    assert whole.digits.tolist() == list(range(10))
    assert whole.nfe_per_sample == 4 and whole.samples_per_second > 0
    torch.testing.assert_close(whole.images, chunked.images, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- reward


def test_reward_is_log_probability_of_prompted_digit():
    class FixedLogits(torch.nn.Module):
        def forward(self, images):
            return torch.arange(10.0).expand(len(images), -1) + 0 * images.sum()

    reward = DigitClassifierReward(classifier=FixedLogits())
    expected = torch.arange(10.0).log_softmax(dim=0)
    rewards = reward(torch.rand(2, 3, 32, 32), ["the number 9", "a handwritten digit two"])
    torch.testing.assert_close(rewards, expected[[9, 2]])


def test_reward_gradient_reaches_the_image(tiny_testbed):
    module_name, class_name = "diffusers_dmdr.digits.reward.DigitClassifierReward".rsplit(".", 1)
    reward = getattr(importlib.import_module(module_name), class_name)(model=str(tiny_testbed.reward_weights))
    assert isinstance(reward, torch.nn.Module) and isinstance(reward.classifier, RewardDigitNet)
    reward.train()
    assert not reward.training and not reward.classifier.training
    assert not any(parameter.requires_grad for parameter in reward.parameters())

    # 64 px input exercises the resize; the graph must survive it.
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    rewards = reward(images, ["the number 1", "handwritten eight", "a drawing of the digit 0"])
    assert rewards.shape == (3,) and rewards.requires_grad and (rewards <= 0).all()
    rewards.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in reward.parameters())


def test_reward_missing_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffusers_dmdr.digits"):
        DigitClassifierReward(model=tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- metrics


def test_frechet_distance_of_identical_sets_is_zero():
    features = torch.randn(200, 16, dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances, FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.0])
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    closed_form = float((mean_a - mean_b).pow(2).sum() + (std_a - std_b).pow(2).sum())
    fd = frechet_distance_from_moments(mean_a, torch.diag(std_a**2), mean_b, torch.diag(std_b**2))
    assert fd == pytest.approx(closed_form, rel=1e-10)

    # From samples of those Gaussians, within sampling error.
    generator = torch.Generator().manual_seed(0)
    samples_a = mean_a + std_a * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    samples_b = mean_b + std_b * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    assert frechet_distance(samples_a, samples_b) == pytest.approx(closed_form, rel=1e-2)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(1)
    factor_a, factor_b = torch.randn(2, 8, 8, generator=generator, dtype=torch.float64)
    covariance_a, covariance_b = factor_a @ factor_a.T + 0.1 * torch.eye(8), factor_b @ factor_b.T
    mean_a, mean_b = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    # The reference FID formula (pytorch-fid): tr(sqrtm(A @ B)) with scipy.
    sqrt_product = scipy_linalg.sqrtm(covariance_a.numpy() @ covariance_b.numpy()).real
    reference = float(
        ((mean_a - mean_b) ** 2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * np.trace(sqrt_product)
    )
    assert frechet_distance_from_moments(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(
        reference, rel=1e-8
    )


def test_knn_precision_recall_reference_cases():
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert knn_precision_recall(features, features, k=3) == (1.0, 1.0)
    assert knn_precision_recall(features, features + 1e3, k=3) == (0.0, 0.0)
    # Fakes collapsed onto one real point: all precise, and they cover only the real points within radius 0.
    collapsed = features[:1].repeat(10, 1)
    precision, recall = knn_precision_recall(features, collapsed, k=3)
    assert precision == 1.0 and recall == pytest.approx(1 / 50)


def test_diversity_on_known_points():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    assert mean_pairwise_distance(points[:2]) == pytest.approx(5.0)
    # Groups {0, 1} (distance 5) and {2, 3} (distance 10).
    assert per_prompt_diversity(points, ["a", "a", "b", "b"]) == pytest.approx(7.5)
    assert mean_pairwise_distance(torch.zeros(5, 3)) == 0.0


def test_evaluate_digits_and_eval_classifier_round_trip(tiny_testbed):
    classifier = load_eval_classifier(tiny_testbed.eval_weights)
    assert isinstance(classifier, EvalDigitNet) and not classifier.training
    images, digits = torch.rand(20, 3, 32, 32), torch.arange(10).repeat(2)
    prompts = [f"the number {digit}" for digit in digits.tolist()]
    metrics = evaluate_digits(classifier, images, digits, prompts, real_images=images)
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["diversity"] > 0


def test_reward_loads_through_the_trainers_reward_spec(tiny_testbed):
    from diffusers_dmdr.rewards import load_rewards

    (loaded,) = load_rewards([tiny_testbed.reward_spec(weight=0.5)], "cpu")
    assert loaded.weight == 0.5 and loaded.hinge is None
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    loaded.fn(images, ["the number 2", "handwritten six"]).sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.slow
def test_full_build_passes_the_teacher_gate(tmp_path):
    # The real build (about 5 minutes on one CPU thread): the teacher must be a trustworthy yardstick.
    testbed = build_testbed(tmp_path, progress=False)
    assert testbed.gate_passed, testbed.report["teacher_gate"]
    assert testbed.report["eval_classifier_real_accuracy"] >= 0.95
    assert testbed.report["reward_classifier_real_accuracy"] >= 0.9
