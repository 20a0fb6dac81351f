"""Digit pairs: compositional prompts ("a 3 to the left of a 7") and 32 x 64 images made of two real digits.

A pair `(left, right)` is drawn as one 32 x 32 scikit-learn digit of `left` in the left half and one of `right` in
the right half (`compose_pairs`). The images of a split are made only from that split's single digits (see
`diffusers_dmdr.digits.data`), so the evaluation pairs never share a stroke with the training pairs.

Prompts name the two digits and their order in one of `PAIR_TEMPLATES`; two of the four phrasings name the right
digit first ("a 7 to the right of a 3"), so a model that copies the word order into the image gets them wrong.

Held-out pairs (`HELD_OUT_PAIRS`): the 20 ordered pairs `(a, b)` with `b - a = 3` or `7` (mod 10). Each digit is
the left digit of exactly two of them and the right digit of two, and both orders of each unordered pair are held
out together, so neither order was seen. The teacher is trained on all 100 pairs (it plays a pretrained model that
knows the whole prompt space); the student's training prompts (`train_pair_prompts`) leave the held-out pairs out,
and every headline number of the demo and the reproduction is on the held-out pairs (`eval_pair_prompts`).
"""

import re
from collections.abc import Sequence

import torch

from .data import DIGIT_WORDS, DIGITS_RESOLUTION, NUM_DIGITS


# Image size of a pair: two square digits side by side.
PAIR_HEIGHT = DIGITS_RESOLUTION
PAIR_WIDTH = 2 * DIGITS_RESOLUTION
# Phrasings; `{left}`/`{right}` are numerals, `{left_word}`/`{right_word}` digit names.
PAIR_TEMPLATES = (
    "a {left} to the left of a {right}",
    "a {right} to the right of a {left}",
    "{left_word} on the left and {right_word} on the right",
    "{right_word} on the right and {left_word} on the left",
)
# Differences `right - left (mod 10)` of the held-out pairs.
HELD_OUT_OFFSETS = (3, 7)
ALL_PAIRS = tuple((left, right) for left in range(NUM_DIGITS) for right in range(NUM_DIGITS))
HELD_OUT_PAIRS = tuple(pair for pair in ALL_PAIRS if (pair[1] - pair[0]) % NUM_DIGITS in HELD_OUT_OFFSETS)
TRAIN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

_DIGIT = r"(" + "|".join(DIGIT_WORDS) + r"|[0-9])"


def _template_pattern(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("left", "right", "left_word", "right_word"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{_DIGIT[1:-1]})")
    return re.compile(r"^\s*" + pattern + r"\s*$", re.IGNORECASE)


_TEMPLATE_PATTERNS = tuple(_template_pattern(template) for template in PAIR_TEMPLATES)


def pair_prompt(left: int, right: int, template_index: int = 0) -> str:
    """The prompt for `left` beside `right` in the phrasing `PAIR_TEMPLATES[template_index]`."""
    template = PAIR_TEMPLATES[template_index % len(PAIR_TEMPLATES)]
    return template.format(left=left, right=right, left_word=DIGIT_WORDS[left], right_word=DIGIT_WORDS[right])


def _digit_value(token: str) -> int:
    token = token.lower()
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token)


def parse_pair(prompt: str) -> tuple[int, int]:
    """`(left digit, right digit)` of a prompt written in one of `PAIR_TEMPLATES` (case and spacing free).

    Raises:
        `ValueError`: if the prompt follows none of the phrasings.
    """
    for pattern in _TEMPLATE_PATTERNS:
        match = pattern.match(prompt)
        if match:
            groups = match.groupdict()
            left = groups.get("left") or groups.get("left_word")
            right = groups.get("right") or groups.get("right_word")
            return _digit_value(left), _digit_value(right)
    examples = "; ".join(repr(pair_prompt(3, 7, index)) for index in range(len(PAIR_TEMPLATES)))
    raise ValueError(f"The prompt {prompt!r} names no digit pair: write it like one of {examples}.")


def pair_prompts(pairs: Sequence[tuple[int, int]] = ALL_PAIRS) -> list[str]:
    """Every phrasing of every pair in `pairs`, pair-major."""
    return [pair_prompt(left, right, index) for left, right in pairs for index in range(len(PAIR_TEMPLATES))]


def train_pair_prompts() -> list[str]:
    """The student's training prompts: every phrasing of the 80 pairs that are not held out (320 prompts)."""
    return pair_prompts(TRAIN_PAIRS)


def eval_pair_prompts() -> list[str]:
    """The evaluation prompts: every phrasing of the 20 held-out pairs (80 prompts)."""
    return pair_prompts(HELD_OUT_PAIRS)


def compose_pairs(left_images: torch.Tensor, right_images: torch.Tensor) -> torch.Tensor:
    """Pair images of shape `(N, C, H, 2W)`: `left_images` (N, C, H, W) in the left half, `right_images` right."""
    return torch.cat([left_images, right_images], dim=-1)


def split_halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left and right halves `(N, C, H, W/2)` of pair images `(N, C, H, W)`."""
    half = images.shape[-1] // 2
    return images[..., :half], images[..., half:]


def sample_real_pairs(
    images: torch.Tensor,
    labels: torch.Tensor,
    pairs: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pair images for the rows `(left, right)` of `pairs` (shape `(N, 2)`), each half a random real digit.

    Args:
        images (`torch.Tensor`): single digits `(M, 3, 32, 32)` of one split.
        labels (`torch.Tensor`): their digits `(M,)`.
        pairs (`torch.Tensor`): int64 `(N, 2)`.
        generator (`torch.Generator`): draws which image of each digit is used.

    Returns:
        `torch.Tensor`: `(N, 3, 32, 64)` in [0, 1].
    """
    members = [torch.nonzero(labels == digit).flatten() for digit in range(NUM_DIGITS)]
    counts = torch.tensor([len(index) for index in members])
    if (counts == 0).any():
        raise ValueError(f"Every digit needs at least one image to draw pairs from; counts per digit: {counts}.")
    picks = []
    for column in range(2):
        digits = pairs[:, column]
        position = (torch.rand(len(pairs), generator=generator) * counts[digits]).long()
        picks.append(torch.stack([members[d][p] for d, p in zip(digits.tolist(), position.tolist(), strict=True)]))
    return compose_pairs(images[picks[0]], images[picks[1]])


def random_pairs(num: int, generator: torch.Generator, pairs: Sequence[tuple[int, int]] = ALL_PAIRS) -> torch.Tensor:
    """`num` ordered pairs drawn uniformly from `pairs`, int64 `(num, 2)`."""
    table = torch.tensor(pairs)
    return table[torch.randint(0, len(table), (num,), generator=generator)]
