"""The digit-pairs testbed on reduced settings: data, prompts, teacher build and reload, rewards, metrics vs references."""

import importlib

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS_SETTINGS as TINY_SETTINGS

from diffusers_dmdr.digits import (
    HELD_OUT_PAIRS,
    PAIR_TEMPLATES,
    TRAIN_PAIRS,
    DigitClassifierReward,
    DigitPairReward,
    DigitsTestbed,
    EvalDigitNet,
    RewardDigitNet,
    all_prompts,
    build_testbed,
    eval_pair_prompts,
    evaluate_pairs,
    frechet_distance,
    frechet_distance_from_moments,
    knn_precision_recall,
    load_eval_classifier,
    mean_pairwise_distance,
    pair_prompt,
    pair_prompts,
    parse_digit,
    parse_pair,
    per_prompt_diversity,
    predict_pairs,
    sample_pairs,
    sample_real_pairs,
    split_indices,
    teacher_budget_curve,
    train_pair_prompts,
    write_prompts_file,
)
from diffusers_dmdr.digits.teacher import DIGITS_MAX_LENGTH, digits_text_encoder, digits_tokenizer


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
    for prompt in all_prompts() + pair_prompts():
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


def test_every_pair_prompt_parses_back_to_its_pair():
    prompts = pair_prompts()
    assert len(prompts) == len(set(prompts)) == 400
    for left in range(10):
        for right in range(10):
            for index in range(len(PAIR_TEMPLATES)):
                assert parse_pair(pair_prompt(left, right, index)) == (left, right)
    # Two phrasings name the right digit first: the order of the words is not the order in the image.
    assert pair_prompt(3, 7, 1) == "a 7 to the right of a 3" and parse_pair("A 7 to the right of a 3 ") == (3, 7)
    assert parse_pair("Nine on the right and two on the left") == (2, 9)
    for bad in ("a 3 and a 7", "the number 3", "a 3 to the left of a 77"):
        with pytest.raises(ValueError, match="names no digit pair"):
            parse_pair(bad)


def test_held_out_pairs_are_balanced_and_disjoint_from_training():
    assert len(HELD_OUT_PAIRS) == 20 and len(TRAIN_PAIRS) == 80 and not set(HELD_OUT_PAIRS) & set(TRAIN_PAIRS)
    for digit in range(10):
        assert sum(left == digit for left, _ in HELD_OUT_PAIRS) == 2
        assert sum(right == digit for _, right in HELD_OUT_PAIRS) == 2
    # Both orders of a held-out pair are held out together.
    assert all((right, left) in HELD_OUT_PAIRS for left, right in HELD_OUT_PAIRS)
    train, held_out = train_pair_prompts(), eval_pair_prompts()
    assert len(train) == 320 and len(held_out) == 80
    assert {parse_pair(prompt) for prompt in held_out} == set(HELD_OUT_PAIRS)
    assert not {parse_pair(prompt) for prompt in train} & set(HELD_OUT_PAIRS)


def test_real_pairs_put_the_left_digit_in_the_left_half():
    # Single "digits" whose pixels all equal their label / 10: the halves tell which digit was used.
    labels = torch.arange(10).repeat(3)
    images = (labels.float() / 10)[:, None, None, None].expand(-1, 3, 32, 32)
    pairs = torch.tensor([[3, 7], [7, 3], [0, 9]])
    composed = sample_real_pairs(images, labels, pairs, torch.Generator().manual_seed(0))
    assert composed.shape == (3, 3, 32, 64)
    torch.testing.assert_close(composed[:, 0, 0, [0, 31]], pairs[:, :1].float().expand(-1, 2) / 10)
    torch.testing.assert_close(composed[:, 0, 0, [32, 63]], pairs[:, 1:].float().expand(-1, 2) / 10)
    with pytest.raises(ValueError, match="at least one image"):
        sample_real_pairs(images[:5], labels[:5], pairs, torch.Generator())


# ---------------------------------------------------------------------------------------------- teacher and sampling


def test_budget_curve_checkpoint_is_the_teacher_a_build_of_that_budget_trains(tiny_testbed):
    """One long U-Net run scored at checkpoint k equals a k-step build's gate (the curve's premise, docs/digits.md);
    the earlier checkpoint is the negative control."""
    scale = TINY_SETTINGS.gate_guidance_scale
    curve = teacher_budget_curve(
        [1, TINY_SETTINGS.unet_steps], TINY_SETTINGS, guidance_scales=(scale,), progress=False
    )
    assert [(row["unet_steps"], row["guidance_scale"]) for row in curve] == [(1, scale), (2, scale)]
    gate = tiny_testbed.report["teacher_gate"]
    keys = ("pair_accuracy", "fd", "precision", "recall", "diversity")
    assert {key: curve[1][key] for key in keys} == pytest.approx(
        {key: gate[key] for key in keys}, rel=1e-5, nan_ok=True
    )
    # The EMA moves little in two tiny steps, but enough for the same tolerance to tell the checkpoints apart.
    assert curve[0]["fd"] != pytest.approx(gate["fd"], rel=1e-5)


def test_teacher_builds_saves_and_loads_as_sdxl(tiny_testbed, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    report = tiny_testbed.report
    assert tiny_testbed.prompts_file.read_text().splitlines() == train_pair_prompts()
    assert tiny_testbed.eval_prompts_file.read_text().splitlines() == eval_pair_prompts()
    assert set(report["teacher_gate"]) >= {"pair_accuracy", "left_accuracy", "fd", "precision", "recall", "diversity"}
    assert report["teacher_gate"]["num_samples"] == 20 and report["teacher_accuracy_band"] == [0.4, 0.85]
    assert sum(report["split_sizes"].values()) == 1797
    assert (report["height"], report["width"]) == (32, 64)

    pipeline = DiffusionPipeline.from_pretrained(tiny_testbed.teacher_dir)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    assert vae_factor == 8  # SD's factor: a pair is a 4 x 4 x 8 latent
    assert tuple(pipeline.unet.config.sample_size) == (4, 8)
    # The text encoders were trained with the U-Net (train_text_encoders): they are no longer their random start.
    random_start = digits_text_encoder(with_projection=True, vocab_size=len(pipeline.tokenizer_2), seed=1)
    trained = pipeline.text_encoder_2.state_dict()
    assert not all(torch.equal(trained[name], value) for name, value in random_start.state_dict().items())
    assert not pipeline.text_encoder_2.training
    # The reloaded word-level tokenizer still splits prompts into whole words.
    assert pipeline.tokenizer_2.tokenize("a 3 to the left of a 7") == [
        "a</w>",
        "3</w>",
        "to</w>",
        "the</w>",
        "left</w>",
        "of</w>",
        "a</w>",
        "7</w>",
    ]

    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        ["a 3 to the left of a 7", "five on the right and one on the left"],
        num_inference_steps=2,
        guidance_scale=4.0,
        height=32,
        width=64,
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 64) and torch.isfinite(images).all()

    # A second build with the same settings reuses the cache.
    again = build_testbed(tiny_testbed.root.parent, TINY_SETTINGS, progress=False)
    assert again.root == tiny_testbed.root and again.report["seconds"] == report["seconds"]


def test_gate_is_the_pair_accuracy_band(tiny_testbed):
    for accuracy, passed in ((0.39, False), (0.4, True), (0.62, True), (0.85, True), (0.86, False)):
        report = {**tiny_testbed.report, "teacher_gate": {"pair_accuracy": accuracy}}
        assert DigitsTestbed(tiny_testbed.root, report).gate_passed is passed
    # A 2-step teacher is nowhere near the band.
    assert not tiny_testbed.gate_passed


def test_sample_pairs_is_seeded_per_sample(tiny_testbed):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_testbed.teacher_dir)
    kwargs = {"num_per_pair": 1, "num_inference_steps": 2, "guidance_scale": 3.0, "progress": False}
    whole = sample_pairs(pipeline, HELD_OUT_PAIRS[:6], batch_size=6, **kwargs)
    chunked = sample_pairs(pipeline, HELD_OUT_PAIRS[:6], batch_size=4, **kwargs)
    assert whole.images.shape == (6, 3, 32, 64)
    assert whole.images.min() >= 0 and whole.images.max() <= 1
    assert [tuple(pair) for pair in whole.digits.tolist()] == list(HELD_OUT_PAIRS[:6])
    assert [parse_pair(prompt) for prompt in whole.prompts] == list(HELD_OUT_PAIRS[:6])
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


class IntensityDigitNet(torch.nn.Module):
    """Reads a 32 x 32 image of constant grey level d / 10 as the digit d (logits peaked there); its features are the
    mean and the spread of the pixels. A known classifier for the pair reward and the pair metrics."""

    def forward(self, images):
        level = images.mean(dim=(1, 2, 3))
        return -1e4 * (level[:, None] - torch.arange(10.0) / 10).pow(2)

    def features(self, images):
        return torch.stack([images.mean(dim=(1, 2, 3)), images.std(dim=(1, 2, 3))], dim=1)


def constant_pairs(pairs, noise=0.0, seed=0):
    """Pair images whose left half has grey level left / 10 and right half right / 10 (plus optional noise)."""
    pairs = torch.as_tensor(pairs)
    left = (pairs[:, 0].float() / 10)[:, None, None, None].expand(-1, 3, 32, 32)
    right = (pairs[:, 1].float() / 10)[:, None, None, None].expand(-1, 3, 32, 32)
    images = torch.cat([left, right], dim=-1)
    return images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_pair_reward_is_the_sum_of_the_halves_log_probabilities():
    classifier = IntensityDigitNet()
    reward = DigitPairReward(classifier=classifier)
    images = constant_pairs([[3, 7], [2, 9]]).requires_grad_(True)
    prompts = ["a 3 to the left of a 7", "nine on the right and two on the left"]
    rewards = reward(images, prompts)
    halves = torch.cat([images[..., :32], images[..., 32:]])
    log_probs = classifier(halves).log_softmax(dim=-1)
    expected = log_probs[[0, 1], [3, 2]] + log_probs[[2, 3], [7, 9]]
    torch.testing.assert_close(rewards, expected)
    assert (rewards > -1e-3).all()  # the images are what the prompts ask for
    # Swapped order: the same digits, the wrong places, a much lower reward.
    swapped = reward(images, ["a 7 to the left of a 3", "a 2 to the right of a 9"])
    assert (swapped < rewards - 10).all()
    rewards.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="names no digit pair"):
        reward(images, ["the number 3", "the number 4"])


def test_pair_metrics_on_known_classifier_and_pairs():
    classifier = IntensityDigitNet()
    pairs = torch.tensor([[3, 7], [2, 9], [0, 3], [5, 5]]).repeat(5, 1)
    prompts = [pair_prompt(left, right) for left, right in pairs.tolist()]
    real = constant_pairs(pairs, noise=0.01, seed=1)
    assert predict_pairs(classifier, real).tolist() == pairs.tolist()

    right_order = evaluate_pairs(classifier, constant_pairs(pairs, noise=0.01, seed=2), pairs, prompts, real)
    assert right_order["pair_accuracy"] == right_order["left_accuracy"] == right_order["accuracy"] == 1.0
    assert right_order["fd"] < 1e-3 and right_order["diversity"] > 0
    # The same digits in swapped halves: only the (5, 5) pair stays right, and the features move away.
    swapped = evaluate_pairs(classifier, constant_pairs(pairs.flip(1), 0.01, 3), pairs, prompts, real)
    assert swapped["pair_accuracy"] == swapped["left_accuracy"] == swapped["right_accuracy"] == 0.25
    assert swapped["fd"] > 100 * right_order["fd"]
    # Only the left digit right.
    half = evaluate_pairs(
        classifier, constant_pairs(torch.stack([pairs[:, 0], (pairs[:, 1] + 1) % 10], 1)), pairs, prompts, real
    )
    assert (half["left_accuracy"], half["right_accuracy"], half["pair_accuracy"], half["accuracy"]) == (1, 0, 0, 0.5)


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
    scipy_linalg = pytest.importorskip(
        "scipy.linalg", reason="the closed-form reference needs scipy, which scikit-learn (a dependency) installs"
    )
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


def test_evaluate_pairs_and_eval_classifier_round_trip(tiny_testbed):
    classifier = load_eval_classifier(tiny_testbed.eval_weights)
    assert isinstance(classifier, EvalDigitNet) and not classifier.training
    images, pairs = (
        torch.rand(20, 3, 32, 64),
        torch.stack([torch.arange(10), torch.arange(10).flip(0)], 1).repeat(2, 1),
    )
    prompts = [f"a {left} to the left of a {right}" for left, right in pairs.tolist()]
    metrics = evaluate_pairs(classifier, images, pairs, prompts, real_images=images)
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert 0.0 <= metrics["pair_accuracy"] <= metrics["accuracy"] <= 1.0 and metrics["diversity"] > 0


def test_reward_loads_through_the_trainers_reward_spec(tiny_testbed):
    from diffusers_dmdr.rewards import load_rewards

    (loaded,) = load_rewards([tiny_testbed.reward_spec(weight=0.5)], "cpu")
    assert loaded.weight == 0.5 and loaded.hinge is None
    assert loaded.name == "DigitPairReward"
    images = torch.rand(2, 3, 32, 64, requires_grad=True)
    loaded.fn(images, ["a 2 to the left of a 6", "six on the right and two on the left"]).sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.slow
def test_full_build_puts_the_teacher_in_its_pair_accuracy_band(tmp_path):
    """The real build (about 15 minutes on one CPU thread of a shared machine, too slow for `make test`): the teacher
    must be good but not saturated on the held-out pairs, and the classifiers must read real held-out pairs."""
    testbed = build_testbed(tmp_path, progress=False)
    assert testbed.gate_passed, testbed.report["teacher_gate"]
    assert testbed.report["eval_classifier_real_accuracy"] >= 0.95
    assert testbed.report["reward_classifier_real_accuracy"] >= 0.9
    assert testbed.report["eval_classifier_real_pair_accuracy"] >= 0.9
    assert testbed.report["real_reference"]["pair_accuracy"] >= 0.9
