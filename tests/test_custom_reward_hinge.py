"""A reward named by import path trains with its class's own `default_hinge`, and linearly when it declares none
(issue 27.6): a 0.7 hinge on a reward scoring above 0.7 would give `loss_rl = 0` for all of stage 2."""

import logging

import torch
from torch import nn

from diffusers_dmdr.rewards import load_rewards, parse_reward_spec, validate_reward_specs
from diffusers_dmdr.rewards.core import compute_reward_loss


class BrightReward(nn.Module):
    """Mean brightness: scores in [0, 1], above 0.7 on bright images; declares no `default_hinge`."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class HingedBrightReward(BrightReward):
    """The same scores, with the class's own hinge."""

    default_hinge = 0.95


BRIGHT = f"{__name__}.BrightReward"
HINGED = f"{__name__}.HingedBrightReward"


def test_class_default_hinge_is_used():
    (reward,) = load_rewards([HINGED], "cpu")
    assert reward.hinge == 0.95
    # On a bright image (score 0.9) the class's hinge still trains: 0.95 - 0.9.
    loss, _ = compute_reward_loss([reward], torch.full((1, 3, 4, 4), 0.9), ["a"])
    torch.testing.assert_close(loss, torch.tensor(0.05))


def test_custom_reward_without_default_hinge_is_linear_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        validate_reward_specs([BRIGHT])  # the preflight
        (reward,) = load_rewards([BRIGHT], "cpu")  # and the load, as train.py runs them
    assert reward.hinge is None
    loss, _ = compute_reward_loss([reward], torch.full((1, 3, 4, 4), 0.9), ["a"])
    assert loss.item() != 0.0  # a 0.7 hinge would be relu(0.7 - 0.9) = 0
    torch.testing.assert_close(loss, torch.tensor(-0.9))
    warnings = [r.message for r in caplog.records if "declares no `default_hinge`" in r.message]
    assert len(warnings) == 1, warnings


def test_an_explicit_hinge_wins_over_the_class_default():
    assert parse_reward_spec(f"{HINGED}:1.0:hinge=0.5").hinge == 0.5
    (reward,) = load_rewards([{"name": HINGED, "hinge": None}], "cpu")
    assert reward.hinge is None
    (reward,) = load_rewards([f"{BRIGHT}:1.0:hinge=0.7"], "cpu")
    assert reward.hinge == 0.7
