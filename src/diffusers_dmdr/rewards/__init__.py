"""Differentiable rewards for DMDR's RL branch.

A reward is any callable `(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]` that keeps the
autograd graph. The trainer uses four names:

```python
specs = [parse_reward_spec("hpsv2.1:0.3:prompt_prefix=Realistic photo "), parse_reward_spec("clip:0.3")]
validate_reward_specs(specs)  # before any weights load
rewards = load_rewards(specs, device, dtype)
reward_loss, mean_scores = compute_reward_loss(rewards, images, prompts)
```
"""

from .aesthetic import AestheticReward
from .classifier import ClassifierReward
from .clip import (
    CLIPReward,
    HPSReward,
    HPSv2Reward,
    OpenCLIPTowers,
    PickScoreReward,
    TextImageReward,
    TransformersCLIPTowers,
)
from .core import (
    REWARD_REGISTRY,
    FrozenReward,
    LoadedReward,
    RewardSpec,
    check_recipe_import_paths,
    compute_reward_loss,
    compute_reward_loss_sequentially,
    load_rewards,
    parse_reward_spec,
    resolve_reward_factory,
    reward_names_epilog,
    set_reward_step,
    validate_reward_specs,
)
from .preprocessing import ImagePreprocessing
from .relative import RelativeReward
from .weights import RewardLoadError


__all__ = [
    "REWARD_REGISTRY",
    "AestheticReward",
    "CLIPReward",
    "ClassifierReward",
    "FrozenReward",
    "HPSReward",
    "HPSv2Reward",
    "ImagePreprocessing",
    "LoadedReward",
    "OpenCLIPTowers",
    "PickScoreReward",
    "RelativeReward",
    "RewardLoadError",
    "RewardSpec",
    "TextImageReward",
    "TransformersCLIPTowers",
    "check_recipe_import_paths",
    "compute_reward_loss",
    "compute_reward_loss_sequentially",
    "load_rewards",
    "parse_reward_spec",
    "resolve_reward_factory",
    "reward_names_epilog",
    "set_reward_step",
    "validate_reward_specs",
]
