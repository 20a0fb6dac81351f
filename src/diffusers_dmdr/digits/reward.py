"""The digits reward: log-probability of the prompted digit under a frozen, differentiable CNN classifier.

The analogue, on the digits testbed, of the released ImageNet recipe's classifier reward. It follows the project's
reward protocol, `(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, and keeps the autograd
graph so that the reward's gradient flows through the decoder into the student. The trainer builds it from its
dotted path with keyword options:

```
--reward diffusers_dmdr.digits.reward.DigitClassifierReward:1.0:model=/path/to/reward_classifier.safetensors
```
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .classifiers import RewardDigitNet
from .data import DIGITS_RESOLUTION, parse_digit
from .pairs import parse_pair


class DigitClassifierReward(nn.Module):
    """Reward = `log p(prompted digit | image)` under a frozen [`RewardDigitNet`], in nats (at most 0).

    Args:
        model (`str` or `Path`, *optional*): a `.safetensors` file of `RewardDigitNet` weights, as written by the
            testbed build (`reward_classifier.safetensors`).
        classifier (`nn.Module`, *optional*): an already built classifier mapping `(B, 3, H, W)` images in [0, 1]
            to 10 logits, instead of `model`.
        resolution (`int`, *optional*, defaults to 32): images of another size are resized (bilinear, antialiased)
            to this side before scoring.

    The classifier is frozen (`requires_grad=False`) and in eval mode; gradients still flow to the input images.
    The digit is parsed from each prompt, as a word (`"seven"`) or a numeral (`"7"`).
    """

    # A log-probability is at most 0, so the project's 0.7 hinge would never switch off: train on it linearly.
    default_hinge = None
    # Prompts for the trainer's load-time gradient probe (its generic probe prompts name no digit).
    example_prompts = ("a handwritten digit seven", "the number 3")

    def __init__(
        self,
        model: str | Path | None = None,
        classifier: nn.Module | None = None,
        resolution: int = DIGITS_RESOLUTION,
    ):
        super().__init__()
        if (model is None) == (classifier is None):
            raise ValueError("Pass exactly one of `model` (a .safetensors weights file) or `classifier` (a module).")
        if classifier is None:
            classifier = load_reward_classifier(model)
        self.classifier = classifier.eval().requires_grad_(False)
        self.resolution = resolution

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards of shape `(B,)` for `images` of shape `(B, 3, H, W)` in [0, 1] and their `B` prompts."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False
            )
        # Run the classifier in its own dtype (a trainer may hold frozen towers in half precision).
        dtype = next(self.classifier.parameters(), images).dtype
        log_probs = self.classifier(images.to(dtype)).float().log_softmax(dim=-1)
        digits = torch.tensor([parse_digit(prompt) for prompt in prompts], device=log_probs.device)
        return log_probs.gather(1, digits[:, None]).squeeze(1)

    def train(self, mode: bool = True) -> "DigitClassifierReward":
        # A frozen reward stays in eval mode even when a trainer calls `.train()` on everything it holds.
        return super().train(False)


class DigitPairReward(DigitClassifierReward):
    """Reward = `log p(prompted pair | image)` = `log p(left digit | left half) + log p(right digit | right half)`.

    The same frozen [`RewardDigitNet`] reads each half of a pair image on its own (a factorised pair classifier), in
    nats (at most 0). The pair is parsed from each prompt with [`parse_pair`] ("a 3 to the left of a 7").

    It is the testbed's deliberately hackable reward: a 25k-parameter CNN trained on 270 single digits, which an
    optimiser can push to near-certain log-probabilities with strokes that the separate evaluation classifier does
    not read as digits (the RL-only arm of `make reproduce` shows it). Arguments as for [`DigitClassifierReward`];
    `resolution` is the side of each half.

    ```
    --reward diffusers_dmdr.digits.reward.DigitPairReward:1.0:hinge=none:model=/path/to/reward_classifier.safetensors
    ```
    """

    example_prompts = ("a 3 to the left of a 7", "nine on the right and two on the left")

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards of shape `(B,)` for pair images `(B, 3, H, 2H)` in [0, 1] and their `B` prompts."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        half = images.shape[-1] // 2
        halves = torch.cat([images[..., :half], images[..., half:]])
        if halves.shape[-2:] != (self.resolution, self.resolution):
            halves = F.interpolate(
                halves, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False
            )
        dtype = next(self.classifier.parameters(), halves).dtype
        log_probs = self.classifier(halves.to(dtype)).float().log_softmax(dim=-1)
        pairs = torch.tensor([parse_pair(prompt) for prompt in prompts], device=log_probs.device)
        digits = torch.cat([pairs[:, 0], pairs[:, 1]])
        per_half = log_probs.gather(1, digits[:, None]).squeeze(1)
        return per_half[: len(images)] + per_half[len(images) :]


def load_reward_classifier(path: str | Path) -> RewardDigitNet:
    """A [`RewardDigitNet`] with weights from a `.safetensors` file, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No reward classifier weights at {path}: build them with `python -m diffusers_dmdr.digits` "
            "(it prints the path of `reward_classifier.safetensors`)."
        )
    classifier = RewardDigitNet()
    classifier.load_state_dict(load_file(path))
    return classifier.eval()
