"""Two digit classifiers of different architectures: one is the reward, the other the evaluation yardstick.

- `RewardDigitNet`: a plain three-layer CNN with max pooling, trained on the `reward` split. The student's RL branch
  back-propagates through it, so it is small and smooth (SiLU).
- `EvalDigitNet`: a small residual network with GroupNorm and strided convolutions, trained on the disjoint `eval`
  split with stronger augmentation. It scores generated samples (accuracy for the prompted digit) and gives the
  128-dim features used for Frechet distance, precision, recall and diversity. It never trains anything else, so
  reward hacking of `RewardDigitNet` shows up as a gap between the two.

Both take RGB images in [0, 1] of shape `(B, 3, H, W)` at any `H = W` (they are trained at 32 px) and return logits.
"""

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class RewardDigitNet(nn.Module):
    """A three-layer CNN digit classifier (about 25k parameters); the reward model of the testbed."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(64 * 4, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape `(B, num_classes)` for `images` of shape `(B, 3, H, W)` in [0, 1]."""
        return self.head(self.features(images * 2.0 - 1.0))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.body(hidden)


class EvalDigitNet(nn.Module):
    """A small residual digit classifier (about 0.3M parameters) whose pooled features feed the metrics.

    Args:
        num_classes (`int`, *optional*, defaults to 10): number of output logits.
        feature_dim (`int`, *optional*, defaults to 128): size of the feature vector returned by `features`.
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(
            _ResidualBlock(32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            _ResidualBlock(64),
            nn.Conv2d(64, feature_dim, 3, stride=2, padding=1),
            nn.GroupNorm(8, feature_dim),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of shape `(B, feature_dim)` for `images` of shape `(B, 3, H, W)` in [0, 1]."""
        # The digits are grey: the evaluator looks at luminance only, unlike the reward net.
        grey = images.mean(dim=1, keepdim=True) * 2.0 - 1.0
        return self.blocks(self.stem(grey))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape `(B, num_classes)` for `images` of shape `(B, 3, H, W)` in [0, 1]."""
        return self.head(self.features(images))


def augment_digits(images: torch.Tensor, max_shift: int, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Random integer translations (zero padding) and Gaussian pixel noise, clamped back to [0, 1]."""
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4)
        size = images.shape[-1]
        shifted = torch.empty_like(images)
        offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
        for index, (dy, dx) in enumerate(offsets.tolist()):
            shifted[index] = padded[index, :, dy : dy + size, dx : dx + size]
        images = shifted
    if noise_std > 0:
        images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    max_shift: int = 2,
    noise_std: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train a digit classifier with AdamW, a cosine learning rate and shift/noise augmentation.

    Args:
        model (`nn.Module`): maps `(B, 3, H, W)` images in [0, 1] to logits.
        images (`torch.Tensor`): training images of shape `(N, 3, H, W)` in [0, 1].
        labels (`torch.Tensor`): int64 digits of shape `(N,)`.
        num_steps (`int`, *optional*, defaults to 400): optimizer steps.
        batch_size (`int`, *optional*, defaults to 64): images per step, drawn with replacement.
        learning_rate (`float`, *optional*, defaults to 3e-3): peak AdamW learning rate.
        max_shift (`int`, *optional*, defaults to 2): largest random translation, in pixels.
        noise_std (`float`, *optional*, defaults to 0.05): standard deviation of the added pixel noise.
        seed (`int`, *optional*, defaults to 0): seeds the initialisation-independent randomness (batches,
            augmentation).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.

    Returns:
        `nn.Module`: the same model, trained, in eval mode with gradients disabled.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=num_steps)
    model.train()
    bar = tqdm(range(num_steps), desc=f"train {type(model).__name__}", disable=not progress, leave=False)
    for _ in bar:
        batch_index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch_images = augment_digits(images[batch_index], max_shift, noise_std, generator)
        loss = F.cross_entropy(model(batch_images), labels[batch_index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict_digits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax digits of shape `(N,)` for `images` of shape `(N, 3, H, W)` in [0, 1]."""
    return torch.cat([model(chunk).argmax(dim=-1) for chunk in images.split(batch_size)])


@torch.no_grad()
def extract_features(model: EvalDigitNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`EvalDigitNet` features of shape `(N, feature_dim)` (float64) for `images` of shape `(N, 3, H, W)`."""
    return torch.cat([model.features(chunk).double() for chunk in images.split(batch_size)])
