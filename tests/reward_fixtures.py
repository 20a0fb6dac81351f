"""Tiny, offline reward models saved the way real ones are published, for the reward tests.

Each builder writes real classes at toy size (transformers `CLIPModel`, `ViTForImageClassification`, an aesthetic
MLP head, an open_clip CLIP) into a folder or file, so the tests exercise the same loading code as a Hub download.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusers_dmdr.testing import tiny_clip_model


# The tiny CLIP's vision tower takes 32 px; resizing the shortest edge to 36 then cropping 32 exercises both steps.
TINY_CLIP_RESIZE = 36
TINY_CLIP_CROP = 32
TINY_CLASSIFIER_LABELS = ["tench, Tinca tinca", "goldfish", "great white shark"]


def reference_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A uint8 `(H, W, 3)` image with smooth gradients, hard edges and noise: a photo's mix of frequencies."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([rows / height, cols / width, 0.5 + 0.5 * np.sin(rows / 3.0) * np.cos(cols / 5.0)], axis=-1)
    image[height // 4 : height // 2, width // 3 : width // 2] = (0.9, 0.1, 0.2)
    image += rng.normal(0.0, 0.05, image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 `(H, W, 3)` to float `(1, 3, H, W)` in [0, 1], the decoder's output format."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def save_tiny_clip(folder: str | Path, seed: int = 0, processor_config: bool = True) -> Path:
    """A tiny `CLIPModel` folder (safetensors, tokenizer, optionally a `preprocessor_config.json`)."""
    from transformers import CLIPImageProcessorPil

    folder = Path(folder)
    model, tokenizer = tiny_clip_model(seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if processor_config:
        CLIPImageProcessorPil(
            size={"shortest_edge": TINY_CLIP_RESIZE},
            crop_size={"height": TINY_CLIP_CROP, "width": TINY_CLIP_CROP},
        ).save_pretrained(folder)
    return folder


def save_tiny_aesthetic_head(path: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """An aesthetic-predictor head with the published layer layout (`layers.{0,2,4,6,7}`), smaller widths."""
    torch.manual_seed(seed)
    layers = nn.Sequential(
        nn.Linear(embed_dim, 24),
        nn.Dropout(0.2),
        nn.Linear(24, 12),
        nn.Dropout(0.2),
        nn.Linear(12, 8),
        nn.Dropout(0.1),
        nn.Linear(8, 4),
        nn.Linear(4, 1),
    )
    state_dict = {f"layers.{key}": value for key, value in layers.state_dict().items()}
    torch.save(state_dict, path)
    return Path(path)


def save_tiny_vit_classifier(folder: str | Path, seed: int = 0) -> Path:
    """A tiny `ViTForImageClassification` with three named classes and a 32 px `ViTImageProcessor` config."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        id2label=dict(enumerate(TINY_CLASSIFIER_LABELS)),
        label2id={label: index for index, label in enumerate(TINY_CLASSIFIER_LABELS)},
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


class TinyConvClassifier(nn.Module):
    """A torch image classifier given to `ClassifierReward` by import path (`reward_fixtures.TinyConvClassifier`)."""

    def __init__(self, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixel_values))


def sum_of_pixels_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward function (not a factory) given by import path: mean brightness."""
    return images.mean(dim=(1, 2, 3))


def detached_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward that cuts the graph, which training must refuse."""
    return images.detach().mean(dim=(1, 2, 3))


class DeclaredNonDifferentiableReward(nn.Module):
    """A reward that says it cannot pass gradients (an evaluation metric)."""

    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


# open_clip's text tower uses its own 49408-token BPE vocabulary (bundled with the package, no download).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_open_clip(folder: str | Path, seed: int = 0, preprocess_cfg: dict | None = None) -> Path:
    """A tiny open_clip model in `local-dir:` layout: `open_clip_config.json` + `open_clip_model.safetensors`."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    preprocess_cfg = preprocess_cfg or {"size": 32, "interpolation": "bicubic", "resize_mode": "shortest"}
    config = {"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    return folder
