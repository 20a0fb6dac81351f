"""SRPO-style relative reward (Shen et al., https://huggingface.co/papers/2509.06942), as in DMDR's released SD3.5
"srpo" recipe: the text side of a text-image reward is steered by control words,

    score = < image embedding, (1 + k) text(positive control + prompt) - text(negative control + prompt) >,

which rewards "realistic" over "CG render" for the same prompt instead of the absolute score that reward hacking
inflates.
"""

import torch
from torch import nn

from .clip import TextImageReward


# Control words of the released SRPO-style DMDR code (one of each is drawn per sample).
DEFAULT_POSITIVE_CONTROLS = ("Natural-lighting", "Detailed", "Realistic")
DEFAULT_NEGATIVE_CONTROLS = ("Painting", "CG Render", "Oil")


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
            Control words; one of each is drawn per sample with the global torch RNG. A string separates several
            words with `|`.
        separator (`str`, defaults to `". "`): between the control word and the prompt.
    """

    path_options = ()

    def __init__(
        self,
        reward: "str | TextImageReward" = "hpsv2.1",
        k: float = 0.1,
        positive: str | list[str] = DEFAULT_POSITIVE_CONTROLS,
        negative: str | list[str] = DEFAULT_NEGATIVE_CONTROLS,
        separator: str = ". ",
        **reward_options,
    ):
        super().__init__()
        if isinstance(reward, str):
            from .core import resolve_reward_factory

            reward = resolve_reward_factory(reward)(**reward_options)
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

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Validate the wrapped reward's name and options, without loading weights."""
        from .core import check_reward_options, resolve_reward_factory

        own = ("reward", "k", "positive", "negative", "separator")
        name = options.get("reward", "hpsv2.1")
        if isinstance(name, str):
            inner_options = {key: value for key, value in options.items() if key not in own}
            check_reward_options(name, resolve_reward_factory(name), inner_options)
        for key in ("positive", "negative"):
            if key in options:
                _as_words(options[key])

    def controlled_prompts(self, prompts: list[str], controls: tuple[str, ...]) -> list[str]:
        """Prefix each prompt with a control word drawn uniformly from `controls`."""
        picks = torch.randint(len(controls), (len(prompts),)).tolist() if len(controls) > 1 else [0] * len(prompts)
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
        positive_embeds = self.reward.embed_prompts(self.controlled_prompts(prompts, self.positive), images.device)
        negative_embeds = self.reward.embed_prompts(self.controlled_prompts(prompts, self.negative), images.device)
        text_direction = (1 + self.k) * positive_embeds - negative_embeds
        return self.reward.score_from_embeddings(image_embeds, text_direction)
