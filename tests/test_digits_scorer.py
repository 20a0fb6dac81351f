"""The digit-pairs reward without gradients: a scikit-learn classifier reading the two halves of a pair image."""

import pytest
import torch

from diffusers_dmdr.digits import HELD_OUT_PAIRS, load_digit_splits, pair_prompt, sample_real_pairs
from diffusers_dmdr.digits.scorer import DigitPairScorer
from diffusers_dmdr.rewards import load_rewards
from diffusers_dmdr.rewards.scores import images_to_uint8


@pytest.fixture(scope="module")
def real_pairs():
    images, labels = load_digit_splits()["real"]
    pairs = torch.tensor(HELD_OUT_PAIRS).repeat(3, 1)
    pair_images = sample_real_pairs(images, labels, pairs, torch.Generator().manual_seed(0))
    return images_to_uint8(pair_images), pairs.tolist()


def test_scorer_reads_held_out_real_pairs_and_rejects_swapped_prompts(real_pairs):
    images, pairs = real_pairs
    prompts = [pair_prompt(left, right, index) for index, (left, right) in enumerate(pairs)]
    swapped = [pair_prompt(right, left, index) for index, (left, right) in enumerate(pairs)]
    correct = DigitPairScorer(mode="correct")
    probability = DigitPairScorer()
    # Real digits of the `real` split (never seen by the scorer): most pairs are read right, swapped prompts are not.
    assert sum(correct(images, prompts)) / len(prompts) > 0.85
    assert sum(correct(images, swapped)) / len(prompts) < 0.05
    right, wrong = probability(images, prompts), probability(images, swapped)
    assert all(0.0 <= score <= 1.0 for score in right + wrong)
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.5


def test_log_probability_mode_is_the_log_of_the_pair_read_right(real_pairs):
    images, pairs = real_pairs
    prompts = [pair_prompt(left, right, index) for index, (left, right) in enumerate(pairs)]
    swapped = [pair_prompt(right, left, index) for index, (left, right) in enumerate(pairs)]
    scorer = DigitPairScorer(mode="log_probability")
    halves = scorer.read_halves(images)
    rows = torch.arange(len(pairs))
    pairs_tensor = torch.tensor(pairs)
    prompted = (
        torch.from_numpy(halves[rows, 0, pairs_tensor[:, 0]]),
        torch.from_numpy(halves[rows, 1, pairs_tensor[:, 1]]),
    )
    expected = sum(torch.log(half.clamp_min(1e-12)) for half in prompted)
    right = torch.tensor(scorer(images, prompts), dtype=torch.float64)
    wrong = torch.tensor(scorer(images, swapped), dtype=torch.float64)
    torch.testing.assert_close(right, expected)
    # Nats, at most 0, finite even where the classifier rules a half out; a swapped prompt costs many nats.
    assert bool((right <= 0).all()) and bool(torch.isfinite(wrong).all())
    assert right.mean() > wrong.mean() + 5.0


def test_scorer_is_a_reward_without_gradients(real_pairs):
    images, pairs = real_pairs
    spec = "diffusers_dmdr.digits.scorer.DigitPairScorer:1.0:mode=correct"
    (loaded,) = load_rewards([spec], "cpu", for_training=False)
    assert loaded.fn.differentiable is False
    tensors = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images[:4]]).float() / 255
    prompts = [pair_prompt(left, right) for left, right in pairs[:4]]
    assert loaded.fn(tensors, prompts).tolist() == DigitPairScorer(mode="correct")(images[:4], prompts)
    with pytest.raises(ValueError, match="differentiable = False"):
        load_rewards([spec], "cpu", for_training=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        DigitPairScorer(mode="logits")
