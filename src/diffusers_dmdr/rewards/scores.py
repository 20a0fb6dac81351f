"""Rewards without gradients: anything that scores decoded images (OCR, detectors, VLM judges, people's votes).

Most rewards people want are not differentiable torch modules. Such a reward is a callable

    scorer(images: list[np.ndarray (H, W, 3) uint8] | list[PIL.Image.Image], prompts: list[str]) -> one float per image

declared non-differentiable: its `differentiable` attribute is `False` ([`score_reward`] sets it on a function; a
class sets it as a class attribute). [`ScoreReward`] adapts it to the project's reward protocol (a `(B, 3, H, W)`
tensor in [0, 1] in, a `(B,)` float32 tensor out) and keeps the declaration, so `load_rewards` and the reward-gradient
probe know not to back-propagate through it: it trains with policy-gradient objectives (`--rl grpo`, `--rl dpo`) and
is refused by reward back-propagation (`--rl refl`), where it could not pass a gradient.

Two ways in:

- by import path, like any user reward (`--reward my_pkg.judge.score_ocr:1.0`, with `--allow_reward_import_paths`
  when it comes from a recipe file): the path must name a function or class with the `(images, prompts)` signature,
  checked before anything is called;
- `remote` ([`RemoteReward`]): an HTTP endpoint the user runs (a VLM judge served by vLLM behind a small adapter, an
  OCR service), `--reward remote:1.0:url=http://127.0.0.1:8000/score:timeout=30`. It receives JSON
  `{"prompts": [...], "images": [base64 PNG, ...]}` and answers `{"scores": [float, ...]}` (or the bare list), in
  batches of `batch_size`; each request has a time limit, a few bounded retries on transient failures (no answer,
  connection refused, HTTP 5xx or 429), and any other failure is one line naming the URL and what went wrong.
"""

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn


IMAGE_FORMATS = ("uint8", "pil")


class RewardScoringError(RuntimeError):
    """A reward without gradients failed to score a batch (an endpoint that does not answer, or answers wrongly)."""


def score_reward(function: Callable | None = None, *, image_format: str = "uint8"):
    r"""Declare a function `(images, prompts) -> scores` a reward without gradients.

    ```py
    @score_reward
    def text_is_legible(images, prompts):  # images: list of (H, W, 3) uint8 arrays
        return [ocr_match(image, prompt) for image, prompt in zip(images, prompts)]
    ```

    Args:
        function (`Callable`): the scorer.
        image_format (`str`, defaults to `"uint8"`): what it receives: `"uint8"` arrays `(H, W, 3)` or `"pil"` images.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")

    def declare(scorer: Callable) -> Callable:
        scorer.differentiable = False
        scorer.image_format = image_format
        return scorer

    return declare if function is None else declare(function)


def is_score_reward(candidate) -> bool:
    """Whether `candidate` (a function, a class or an instance) declares itself a reward without gradients."""
    return getattr(candidate, "differentiable", True) is False


def images_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """`(B, 3, H, W)` images in [0, 1] to `B` arrays `(H, W, 3)` of uint8 (rounded, clamped; no graph)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


def check_scores(scores, count: int, source: str) -> list[float]:
    """`scores` as `count` finite floats, or `RewardScoringError` naming `source` and what it returned."""
    if isinstance(scores, torch.Tensor | np.ndarray):
        scores = scores.tolist()
    if not isinstance(scores, Sequence) or isinstance(scores, str | bytes):
        raise RewardScoringError(f"{source} returned {type(scores).__name__}, not a list of {count} scores.")
    if len(scores) != count:
        raise RewardScoringError(f"{source} returned {len(scores)} scores for {count} images.")
    values = []
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise RewardScoringError(f"{source} returned a score that is not a finite number: {score!r}.")
        values.append(float(score))
    return values


class ScoreReward(nn.Module):
    r"""A reward without gradients in the project's reward protocol: tensor images in, `(B,)` scores out.

    The images are converted to what the scorer declared (`image_format`) without a graph; the scores come back as a
    float32 tensor on the images' device. `differentiable = False` tells `load_rewards` and the objectives not to
    back-propagate through it.

    Args:
        scorer (`Callable`): `(images, prompts) -> one float per image`.
        image_format (`str`, *optional*): `"uint8"` or `"pil"`; defaults to the scorer's own `image_format`, else
            `"uint8"`.
        name (`str`, *optional*): for error messages; defaults to the scorer's name.
    """

    differentiable = False
    # Scores of an arbitrary scale: no hinge unless a spec asks for one.
    default_hinge = None

    def __init__(self, scorer: Callable, image_format: str | None = None, name: str | None = None):
        super().__init__()
        image_format = image_format or getattr(scorer, "image_format", "uint8")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
        self.scorer = scorer
        self.image_format = image_format
        self.name = name or getattr(scorer, "__name__", type(scorer).__name__)
        # Rewards built for the digits testbed name prompts the load-time checks can use.
        if hasattr(scorer, "example_prompts"):
            self.example_prompts = scorer.example_prompts

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of shape `(B,)` (float32, no graph) for `images` of shape `(B, 3, H, W)` in [0, 1]."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        arrays = images_to_uint8(images)
        if self.image_format == "pil":
            from PIL import Image

            arrays = [Image.fromarray(array) for array in arrays]
        scores = check_scores(self.scorer(arrays, list(prompts)), len(prompts), f"Reward {self.name!r}")
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def encode_png(image: np.ndarray) -> str:
    """An `(H, W, 3)` uint8 array as a base64 PNG string."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class RemoteReward(nn.Module):
    r"""A reward served over HTTP: POST `{"prompts": [...], "images": [base64 PNG, ...]}`, answer `{"scores": [...]}`.

    Never blocks the run forever: a request gives up when the service is silent for `timeout` seconds (connecting or
    waiting) or has not finished its answer after `timeout` seconds (a server that trickles bytes), so within about
    twice `timeout` at worst; and transient failures (no answer in time, connection refused or reset, HTTP 5xx or 429) are
    retried at most `max_retries` times, `retry_wait` seconds apart. Any other failure (HTTP 4xx, an answer that is
    not JSON, a wrong number of scores, a score that is not a finite number) raises [`RewardScoringError`] at once:
    retrying would not change it.

    Args:
        url (`str`): the endpoint, `http://` or `https://`.
        timeout (`float`, defaults to 60.0): seconds allowed per request.
        max_retries (`int`, defaults to 2): extra attempts after a transient failure.
        retry_wait (`float`, defaults to 1.0): seconds between attempts.
        batch_size (`int`, defaults to 16): images per request.
        api_key_env (`str`, *optional*): the name of an environment variable holding a token, sent as
            `Authorization: Bearer <token>` (the token itself never appears in a recipe, a log or a saved config).
    """

    differentiable = False
    default_hinge = None
    path_options = ()

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_retries: int = 2,
        retry_wait: float = 1.0,
        batch_size: int = 16,
        api_key_env: str | None = None,
    ):
        super().__init__()
        self.check_requirements(
            {
                "url": url,
                "timeout": timeout,
                "max_retries": max_retries,
                "batch_size": batch_size,
                "api_key_env": api_key_env,
            }
        )
        self.url, self.timeout, self.max_retries = url, float(timeout), int(max_retries)
        self.retry_wait, self.batch_size = float(retry_wait), int(batch_size)
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self.name = f"remote reward at {url}"

    @staticmethod
    def check_requirements(options: dict) -> None:
        """Check the options before anything loads (called by `validate_reward_specs`); `ValueError` naming the fix."""
        url = options.get("url")
        if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"Reward 'remote' needs url=http://host:port/path (http or https), got {url!r}.")
        if not urllib.parse.urlparse(url).netloc:
            raise ValueError(f"Reward 'remote': the url {url!r} names no host.")
        for key, low in (("timeout", 0.0), ("batch_size", 1), ("max_retries", 0)):
            value = options.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
                raise ValueError(f"Reward 'remote': {key} must be a number >= {low}, got {value!r}.")
            if key == "timeout" and value == 0:
                raise ValueError("Reward 'remote': timeout must be positive (a request without a limit could block).")
        api_key_env = options.get("api_key_env")
        if api_key_env is not None and not os.environ.get(str(api_key_env)):
            raise ValueError(
                f"Reward 'remote': api_key_env={api_key_env!r} names an environment variable that is not set."
            )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of shape `(B,)` (float32, no graph), fetched `batch_size` images per request."""
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts.")
        arrays, scores = images_to_uint8(images), []
        for start in range(0, len(arrays), self.batch_size):
            batch_prompts = list(prompts[start : start + self.batch_size])
            payload = {
                "prompts": batch_prompts,
                "images": [encode_png(a) for a in arrays[start : start + self.batch_size]],
            }
            scores += self.request(payload, len(batch_prompts))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def request(self, payload: dict, count: int) -> list[float]:
        """POST one batch and return its `count` scores, retrying transient failures."""
        body = json.dumps(payload).encode("utf-8")
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                answer = self._post(body)
            except _TransientError as error:
                if attempt == attempts:
                    raise RewardScoringError(
                        f"Remote reward {self.url}: {error} ({attempts} attempt{'s' * (attempts > 1)}, "
                        f"{self.timeout:g} s each); check that the service is running and answering."
                    ) from None
                time.sleep(self.retry_wait)
                continue
            return self._parse(answer, count)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                chunks = []
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _TransientError(f"no complete answer within {self.timeout:g} s")
                    # Each read waits at most `timeout` (the socket's limit) and the deadline is checked between
                    # reads, so a server that trickles bytes cannot hold the run either.
                    chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code == 429:
                raise _TransientError(f"HTTP {error.code} {error.reason}") from None
            raise RewardScoringError(f"Remote reward {self.url}: HTTP {error.code} {error.reason}.") from None
        except (TimeoutError, ConnectionError) as error:
            raise _TransientError(_describe(error, self.timeout)) from None
        except urllib.error.URLError as error:
            raise _TransientError(_describe(error.reason, self.timeout)) from None

    def _parse(self, answer: bytes, count: int) -> list[float]:
        source = f"Remote reward {self.url}"
        try:
            decoded = json.loads(answer.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            preview = answer[:60].decode("utf-8", "replace")
            raise RewardScoringError(f"{source} did not answer JSON (it began {preview!r}).") from None
        if isinstance(decoded, dict):
            if "scores" not in decoded:
                raise RewardScoringError(f"{source} answered JSON without a 'scores' key (keys: {sorted(decoded)}).")
            decoded = decoded["scores"]
        return check_scores(decoded, count, source)


class _TransientError(Exception):
    """A failure a retry may cure."""


def _describe(error, timeout: float) -> str:
    if isinstance(error, TimeoutError) or "timed out" in str(error):
        return f"no answer within {timeout:g} s"
    return f"{type(error).__name__}: {error}"
