"""Video samples on disk: a grid of clips as one animated GIF (validation and the model card of video students).

PIL writes the file (no ffmpeg or imageio needed); each frame of the GIF is the grid of that frame of every clip, so
the card shows all validation prompts playing side by side. diffusers' `export_to_gif` writes one clip per file with
the same PIL call; this is its grid form.
"""

from pathlib import Path

import torch

from .utils import image_grid


# Wan's native frame rate (81 frames = 5 s).
DEFAULT_FPS = 16


def save_video_grid(videos: torch.Tensor, path: str | Path, rows: int, fps: int = DEFAULT_FPS) -> Path:
    """Tile `(B, 3, F, H, W)` clips in `[0, 1]` into a `rows x ceil(B / rows)` grid per frame and save the frames as
    a looping animated GIF at `fps`."""
    if videos.ndim != 5:
        raise ValueError(f"save_video_grid takes clips (B, 3, F, H, W); got shape {tuple(videos.shape)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [image_grid(videos[:, :, index], rows) for index in range(videos.shape[2])]
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0, optimize=False
    )
    return path
