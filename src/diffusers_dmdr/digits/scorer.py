"""A reward without gradients for the digit-pairs testbed: a scikit-learn classifier reading the two halves.

The testbed's own reward (`DigitPairReward`) is a differentiable torch CNN, which reward back-propagation (ReFL) needs.
This one is the other kind, the kind most real rewards are (OCR, detectors, judges): a scikit-learn logistic
regression on 8 x 8 grey digits, fed uint8 images, with no gradient to offer. Policy-gradient objectives
(`--rl grpo`, `--rl dpo`) train on it; ReFL refuses it at load time.

It reads each 32 x 32 half of a pair image the way scikit-learn's digits were drawn: grey, pooled to 8 x 8, on the
0-16 scale. It is trained when built (about a second) on the testbed's `reward` split, the same images the torch
reward classifier learnt from and disjoint from the evaluation classifier's, so the held-out pair accuracy of the demo
stays an independent yardstick. There are no weights to download or unpickle.

```
--reward diffusers_dmdr.digits.scorer.DigitPairScorer:1.0
--reward diffusers_dmdr.digits.scorer.DigitPairScorer:1.0:mode=correct
```
"""

import numpy as np

from .data import DIGITS_RESOLUTION, load_digit_splits
from .pairs import parse_pair


# scikit-learn's digits are 8 x 8 with values 0-16.
NATIVE_SIDE = 8
NATIVE_MAX = 16.0
SCORER_MODES = ("probability", "log_probability", "correct")


def pool_to_native(grey: np.ndarray) -> np.ndarray:
    """`(N, S, S)` grey images in [0, 1] (S a multiple of 8) to `(N, 64)` features on scikit-learn's 0-16 scale."""
    count, side = grey.shape[0], grey.shape[-1]
    if side % NATIVE_SIDE or grey.shape[-2] != side:
        raise ValueError(f"Each half must be square with a side divisible by {NATIVE_SIDE}, got {grey.shape[1:]}.")
    factor = side // NATIVE_SIDE
    pooled = grey.reshape(count, NATIVE_SIDE, factor, NATIVE_SIDE, factor).mean(axis=(2, 4))
    return pooled.reshape(count, -1) * NATIVE_MAX


class DigitPairScorer:
    r"""Reward = how well a scikit-learn classifier reads the prompted pair in a `(32, 64)` pair image; no gradient.

    Args:
        mode (`str`, defaults to `"probability"`): `"probability"`, the mean over the two halves of the classifier's
            probability of the prompted digit (in [0, 1]); `"log_probability"`, the classifier's log-probability of the
            prompted pair, `log p(left digit | left half) + log p(right digit | right half)` in nats (at most 0: the
            quantity the torch reward of the ReFL recipe computes, here from a model without gradients; one wrong half
            costs far more than under the mean probability, which is what held-out pair accuracy counts);
            `"correct"`, 1 when both halves are read as the prompted digits, else 0 (the pair's 0/1 correctness: sparse,
            so groups often carry no signal).
        regularisation (`float`, defaults to 1.0): the inverse regularisation strength `C` of the logistic regression.
        seed (`int`, defaults to 0): the solver's seed.
    """

    differentiable = False
    image_format = "uint8"
    example_prompts = ("a 3 to the left of a 7", "nine on the right and two on the left")

    def __init__(self, mode: str = "probability", regularisation: float = 1.0, seed: int = 0):
        if mode not in SCORER_MODES:
            raise ValueError(f"mode must be one of {SCORER_MODES}, got {mode!r}.")
        from sklearn.linear_model import LogisticRegression

        images, labels = load_digit_splits(DIGITS_RESOLUTION)["reward"]
        features = pool_to_native(images[:, 0].numpy().astype(np.float64))
        self.classifier = LogisticRegression(C=regularisation, max_iter=5000, random_state=seed)
        self.classifier.fit(features, labels.numpy())
        self.mode = mode

    def read_halves(self, images) -> np.ndarray:
        """Class probabilities `(B, 2, 10)` of the left and right halves of uint8 images `(H, 2H, 3)`."""
        pixels = np.stack([np.asarray(image) for image in images]).astype(np.float64) / 255.0
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[2] != 2 * pixels.shape[1]:
            raise ValueError(f"Expected pair images of shape (H, 2H, 3), got {pixels.shape[1:]}.")
        grey, half = pixels.mean(axis=-1), pixels.shape[1]
        halves = np.concatenate([grey[:, :, :half], grey[:, :, half:]])
        probabilities = self.classifier.predict_proba(pool_to_native(halves))
        return np.stack([probabilities[: len(pixels)], probabilities[len(pixels) :]], axis=1)

    def __call__(self, images, prompts: list[str]) -> list[float]:
        """One score per image (see `mode`) for uint8 pair images and their pair prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        probabilities = self.read_halves(images)
        pairs = np.array([parse_pair(prompt) for prompt in prompts])
        rows = np.arange(len(prompts))
        prompted = np.stack([probabilities[rows, 0, pairs[:, 0]], probabilities[rows, 1, pairs[:, 1]]], axis=1)
        if self.mode == "probability":
            return prompted.mean(axis=1).tolist()
        if self.mode == "log_probability":
            # The floor keeps a half the classifier rules out finite (log 1e-12 = -27.6 nats).
            return np.log(np.maximum(prompted, 1e-12)).sum(axis=1).tolist()
        read = probabilities.argmax(axis=-1)
        return (read == pairs).all(axis=1).astype(np.float64).tolist()
