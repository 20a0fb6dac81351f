"""The digits data: scikit-learn's handwritten digits as small RGB images, their splits and their prompts.

`sklearn.datasets.load_digits()` ships 1,797 grey 8x8 digits (values 0-16) inside scikit-learn, so the testbed needs
no download. They are upsampled bilinearly to `DIGITS_RESOLUTION` (32 px: a 4x-downsampling autoencoder then gives
an 8x8 latent, the size at which the tiny SDXL U-Net is cheapest per sample on a CPU), repeated on three channels,
and split once, stratified by digit and with a fixed seed, into four disjoint parts:

- `teacher`: trains the autoencoder and the teacher U-Net;
- `reward`: trains the reward classifier (the only model the student's RL branch sees);
- `eval`: trains the evaluation classifier (never used for training anything else);
- `real`: the held-out real digits that generated samples are compared with (FD, precision, recall).
"""

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


# Side of the square RGB images the testbed works at (native digits are 8x8).
DIGITS_RESOLUTION = 32
NUM_DIGITS = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings of the training prompts; `{word}` is the digit's name, `{numeral}` its numeral.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "a drawing of the digit {numeral}",
    "handwritten {word}",
)
# Fractions of each digit's images in the four disjoint splits (the remainder goes to `teacher`).
SPLIT_FRACTIONS = {"reward": 0.15, "eval": 0.2, "real": 0.2}
SPLIT_NAMES = ("teacher", "reward", "eval", "real")
# Seed of the one stratified split every model of the testbed is trained on.
SPLIT_SEED = 0

_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def digit_prompt(digit: int, template_index: int = 0) -> str:
    """The prompt for `digit` in the phrasing `PROMPT_TEMPLATES[template_index]`."""
    template = PROMPT_TEMPLATES[template_index % len(PROMPT_TEMPLATES)]
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def all_prompts() -> list[str]:
    """Every prompt of the testbed: each digit in each phrasing, digit-major (40 prompts)."""
    return [digit_prompt(digit, index) for digit in range(NUM_DIGITS) for index in range(len(PROMPT_TEMPLATES))]


def parse_digit(prompt: str) -> int:
    """The digit a prompt names, as a word (`"seven"`) or a numeral (`"7"`); the first one wins.

    Raises:
        `ValueError`: if the prompt names no digit.
    """
    match = _DIGIT_PATTERN.search(prompt)
    if match is None:
        raise ValueError(
            f"The prompt {prompt!r} names no digit: use a digit word ({', '.join(DIGIT_WORDS)}) or a numeral 0-9."
        )
    token = match.group(1).lower()
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token)


def write_prompts_file(path: str | Path, prompts: Sequence[str] | None = None, repeats: int = 1) -> Path:
    """Write prompts to a text file, one per line, for `--train_prompts`.

    Args:
        path (`str` or `Path`): the file to write (its folder is created).
        prompts (`Sequence[str]`, *optional*): defaults to `all_prompts()`.
        repeats (`int`, *optional*, defaults to 1): how many times the list is written, for samplers that
            draw without replacement per epoch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = list(all_prompts() if prompts is None else prompts)
    path.write_text("\n".join(prompts * repeats) + "\n", encoding="utf-8")
    return path


def upsample_digits(digits_8x8: torch.Tensor, resolution: int = DIGITS_RESOLUTION) -> torch.Tensor:
    """Grey 8x8 digits with values 0-16, shape `(N, 8, 8)`, to RGB images in [0, 1], shape `(N, 3, R, R)`."""
    grey = (digits_8x8.float() / 16.0).unsqueeze(1)
    grey = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return grey.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def load_digit_images(resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as RGB images.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `images` of shape `(1797, 3, resolution, resolution)` in [0, 1]
        (float32, white strokes on black) and `labels` of shape `(1797,)` (int64 digits).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = upsample_digits(torch.from_numpy(digits.images), resolution)
    return images, torch.from_numpy(digits.target).long()


def split_indices(labels: torch.Tensor, seed: int = SPLIT_SEED) -> dict[str, torch.Tensor]:
    """A stratified partition of `range(len(labels))` into the testbed's four disjoint splits.

    Every digit is shuffled with `seed` and cut by `SPLIT_FRACTIONS`; `teacher` takes what is left.

    Returns:
        `dict[str, torch.Tensor]`: sorted int64 indices for each name of `SPLIT_NAMES`.
    """
    generator = torch.Generator().manual_seed(seed)
    parts = {name: [] for name in SPLIT_NAMES}
    for digit in range(NUM_DIGITS):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for name, fraction in SPLIT_FRACTIONS.items():
            count = round(fraction * len(members))
            parts[name].append(members[start : start + count])
            start += count
        parts["teacher"].append(members[start:])
    return {name: torch.cat(chunks).sort().values for name, chunks in parts.items()}


def load_digit_splits(
    resolution: int = DIGITS_RESOLUTION, seed: int = SPLIT_SEED
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The four splits as `{name: (images, labels)}`; see `load_digit_images` and `split_indices`."""
    images, labels = load_digit_images(resolution)
    return {name: (images[index], labels[index]) for name, index in split_indices(labels, seed).items()}
