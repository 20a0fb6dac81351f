"""Rewards on video: any image reward per frame on a frame subset, and rewards that score the whole clip.

A video family (Wan) decodes the student's latents to clips `(B, 3, F, H, W)` in `[0, 1]`. The trainer wraps every
loaded reward once ([`video_rewards`]) so that the objective, the reward loss and the RT-DM weights see one callable
`(clips, prompts) -> (B,)` per reward, as for images:

- an image reward `(images, prompts) -> (B,)` scores each chosen frame of each clip, and the clip's score is the mean
  over those frames ([`PerFrameReward`]): the frames are stacked into one `(B * K, 3, H, W)` batch with each prompt
  repeated `K` times, so the reward runs once per step and its gradient reaches every chosen frame;
- a clip reward, a callable that declares `input_kind = "video"` ([`ClipReward`]), gets the clips themselves.

Whether a reward is differentiable is the reward's own business (`differentiable = False` rewards are refused for
training at load time, as for images).
"""

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .core import LoadedReward


# The attribute a reward sets to take whole clips `(B, 3, F, H, W)` instead of images.
VIDEO_INPUT_KIND = "video"


@runtime_checkable
class ClipReward(Protocol):
    """A reward on whole clips: `reward(clips, prompts) -> Tensor[B]`, `clips` of shape `(B, 3, F, H, W)` in `[0, 1]`
    carrying the generator's graph. It declares itself with `input_kind = "video"`."""

    input_kind: str

    def __call__(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def takes_clips(reward) -> bool:
    """Whether `reward` (or the reward a `FrozenReward` wraps) scores whole clips."""
    inner = getattr(reward, "reward", reward)
    return getattr(inner, "input_kind", getattr(reward, "input_kind", "image")) == VIDEO_INPUT_KIND


def select_frames(num_frames: int, frame_indices: list[int] | None) -> list[int]:
    """The frame positions `frame_indices` name in a clip of `num_frames` (negative from the end; `None`: all)."""
    if frame_indices is None:
        return list(range(num_frames))
    positions = []
    for index in frame_indices:
        position = index + num_frames if index < 0 else index
        if not 0 <= position < num_frames:
            raise ValueError(f"--reward_frames {index} is outside the decoded clip's {num_frames} frames.")
        positions.append(position)
    return positions


class PerFrameReward(nn.Module):
    r"""An image reward applied per frame: `score(clip) = mean_k reward(clip[:, :, f_k], prompt)` over the chosen
    frames `f_k` (all when `frame_indices` is `None`).

    Args:
        reward (`Callable`): an image reward `(images, prompts) -> (B,)`.
        frame_indices (`list[int]`, *optional*): frame indices into the decoded clip (negative from the end).
    """

    def __init__(self, reward, frame_indices: list[int] | None = None):
        super().__init__()
        self.reward = reward
        self.frame_indices = None if frame_indices is None else [int(index) for index in frame_indices]
        self.differentiable = getattr(reward, "differentiable", None)

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if clips.ndim != 5:
            raise ValueError(f"A per-frame video reward takes clips (B, 3, F, H, W); got shape {tuple(clips.shape)}.")
        batch_size = clips.shape[0]
        positions = select_frames(clips.shape[2], self.frame_indices)
        # (B, 3, K, H, W) -> (B, K, 3, H, W) -> (B K, 3, H, W): sample-major, so each prompt repeats K times in a row.
        frames = clips[:, :, positions].transpose(1, 2).flatten(0, 1)
        frame_prompts = [prompt for prompt in prompts for _ in positions]
        scores = self.reward(frames, frame_prompts)
        return scores.view(batch_size, len(positions)).mean(dim=1)


def video_rewards(rewards: list[LoadedReward], frame_indices: list[int] | None = None) -> list[LoadedReward]:
    """The loaded rewards of a video run: image rewards wrapped in [`PerFrameReward`] on `frame_indices`, clip rewards
    as they are. Names, weights and hinges are kept."""
    wrapped = []
    for loaded in rewards:
        if takes_clips(loaded.fn) or isinstance(loaded.fn, PerFrameReward):
            wrapped.append(loaded)
            continue
        wrapped.append(
            LoadedReward(
                name=loaded.name,
                fn=PerFrameReward(loaded.fn, frame_indices),
                weight=loaded.weight,
                hinge=loaded.hinge,
                spec=loaded.spec,
            )
        )
    return wrapped
