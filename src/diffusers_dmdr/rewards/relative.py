"""SRPO-style relative reward (Shen et al., https://huggingface.co/papers/2509.06942), as in DMDR's released SD3.5
"srpo" recipe: the text side of a text-image reward is steered by control words,

    score = < image embedding, (1 + k) text(positive control + prompt) - text(negative control + prompt) >,

which rewards "realistic" over "CG render" for the same prompt instead of the absolute score that reward hacking
inflates.
"""

import numpy as np
import torch
from torch import nn

from .clip import TEXT_IMAGE_REWARDS, TextImageReward
from .options import check_reward_options


# Control words of the released SRPO-style DMDR code (one of each is drawn per batch).
DEFAULT_POSITIVE_CONTROLS = ("Natural-lighting", "Detailed", "Realistic")
DEFAULT_NEGATIVE_CONTROLS = ("Painting", "CG Render", "Oil")


def _text_image_reward(name: str) -> type[TextImageReward]:
    """The wrapped reward's class: a text-image reward by name (never an import path: it needs the text tower)."""
    if name not in TEXT_IMAGE_REWARDS:
        raise ValueError(
            f"Unknown reward {name!r} for the relative reward; it wraps one of {sorted(TEXT_IMAGE_REWARDS)}."
        )
    return TEXT_IMAGE_REWARDS[name]


def _as_words(controls: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    # The CLI cannot express lists: "Realistic|Detailed" separates words with "|".
    words = tuple(controls.split("|")) if isinstance(controls, str) else tuple(controls)
    if not words or not all(isinstance(word, str) and word for word in words):
        raise ValueError(f"Control words must be a non-empty list of non-empty strings, got {controls!r}.")
    return words


class RelativeReward(nn.Module):
    r"""Wrap a text-image reward (CLIP, HPS, PickScore) SRPO-style:
    `(1 + k) f(positive + prompt) - f(negative + prompt)` with `f` the wrapped reward on the same image.

    The combination is taken on the normalised text embeddings, so the score is exactly that difference of
    the wrapped reward's scores; the image is embedded once.

    Args:
        reward (`str` or `TextImageReward`, defaults to `"hpsv2.1"`):
            Registry name or dotted path of the wrapped reward, or an instance. Other keyword arguments are its
            options (e.g. `model=/path/HPS_v2.1_compressed.pt`).
        k (`float`, defaults to 0.1): weight of the positive branch above 1 (the paper's 0.1).
        positive, negative (`str` or `list[str]`):
            Control words. A string separates several words with `|`.
        separator (`str`, defaults to `". "`): between the control word and the prompt.
        control_sampling (`str`, defaults to `"batch"`): draw one positive and one negative word per call (per batch,
            as the released code does) or one per `sample`.
        seed (`int`, defaults to 0): the words are drawn from `numpy.random.default_rng([seed, step, call])`, where
            `step` is set by the trainer through [`~RelativeReward.set_step`] and `call` counts the calls within that
            step: a resumed run draws the same words as an uninterrupted one, and the global RNG is never touched.
    """

    path_options = ()

    def __init__(
        self,
        reward: "str | TextImageReward" = "hpsv2.1",
        k: float = 0.1,
        positive: str | list[str] = DEFAULT_POSITIVE_CONTROLS,
        negative: str | list[str] = DEFAULT_NEGATIVE_CONTROLS,
        separator: str = ". ",
        control_sampling: str = "batch",
        seed: int = 0,
        **reward_options,
    ):
        super().__init__()
        if isinstance(reward, str):
            reward = _text_image_reward(reward)(**reward_options)
        elif reward_options:
            raise ValueError(f"Options {sorted(reward_options)} apply to a reward given by name, not an instance.")
        if not isinstance(reward, TextImageReward):
            raise ValueError(
                f"The relative reward needs a text-image reward with separate text embeddings (clip, hpsv2.1, "
                f"pickscore); got {type(reward).__name__}."
            )
        self.reward = reward
        self.k = float(k)
        self.positive = _as_words(positive)
        self.negative = _as_words(negative)
        self.separator = separator
        if control_sampling not in ("batch", "sample"):
            raise ValueError(f"control_sampling must be `batch` or `sample`, got {control_sampling!r}.")
        self.control_sampling = control_sampling
        self.seed = int(seed)
        self.step, self._calls_in_step = 0, 0

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Validate the wrapped reward's name and options, without loading weights."""
        own = ("reward", "k", "positive", "negative", "separator", "control_sampling", "seed")
        name = options.get("reward", "hpsv2.1")
        if isinstance(name, str):
            inner_options = {key: value for key, value in options.items() if key not in own}
            check_reward_options(name, _text_image_reward(name), inner_options)
        for key in ("positive", "negative"):
            if key in options:
                _as_words(options[key])

    def set_step(self, step: int) -> None:
        """Key the next draws to generator step `step` (called by the trainer before each step's rewards)."""
        self.step, self._calls_in_step = int(step), 0

    def draw_rng(self) -> np.random.Generator:
        """The generator of this call's control words: a function of `(seed, step, call within the step)`."""
        rng = np.random.default_rng([self.seed, self.step, self._calls_in_step])
        self._calls_in_step += 1
        return rng

    def controlled_prompts(
        self, prompts: list[str], controls: tuple[str, ...], rng: np.random.Generator | None = None
    ) -> list[str]:
        """Prefix the prompts with control words drawn uniformly from `controls`: one for the whole batch, or one
        per prompt with `control_sampling="sample"`."""
        rng = self.draw_rng() if rng is None else rng
        count = 1 if self.control_sampling == "batch" else len(prompts)
        picks = rng.integers(len(controls), size=count).tolist()
        picks = picks * len(prompts) if count == 1 else picks
        return [controls[pick] + self.separator + prompt for pick, prompt in zip(picks, prompts, strict=True)]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Relative score of each image.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): images in [0, 1], with the graph.
            prompts (`list[str]` of length `B`): their prompts.

        Returns:
            `torch.Tensor` of shape `(B,)`: `(1 + k) f(positive + prompt) - f(negative + prompt)`.
        """
        image_embeds = self.reward.embed_images(images)
        rng = self.draw_rng()
        positive_prompts = self.controlled_prompts(prompts, self.positive, rng)
        negative_prompts = self.controlled_prompts(prompts, self.negative, rng)
        positive_embeds = self.reward.embed_prompts(positive_prompts, images.device)
        negative_embeds = self.reward.embed_prompts(negative_prompts, images.device)
        text_direction = (1 + self.k) * positive_embeds - negative_embeds
        return self.reward.score_from_embeddings(image_embeds, text_direction)
