"""Small I/O helpers shared by the trainer, the export and the demo."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`(B, 3, H, W)` images in `[0, 1]` to PIL images."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in array]


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """Tile `(B, 3, H, W)` images in `[0, 1]` into a `rows x ceil(B / rows)` grid."""
    pil_images = images_to_pil(images)
    columns = -(-len(pil_images) // rows)
    width, height = pil_images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), color=(255, 255, 255))
    for index, image in enumerate(pil_images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, rows: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, rows).save(path)
    return path
