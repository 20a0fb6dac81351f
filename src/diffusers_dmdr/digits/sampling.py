"""Sample digits from any diffusers text-to-image pipeline with fixed per-sample seeds, and time it.

Sample `i` always starts from the noise of `torch.Generator().manual_seed(seed + i)` (diffusers draws each sample
of a batch from its own generator when given a list), so the teacher and a student of the same latent shape start
from the same noise, whatever the batch size: that is what the same-noise grid shows.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .pairs import HELD_OUT_PAIRS, PAIR_HEIGHT, PAIR_TEMPLATES, PAIR_WIDTH, pair_prompt


@dataclass
class DigitSamples:
    """Generated digits and their cost.

    Args:
        images (`torch.Tensor`): shape `(N, 3, H, W)`, float32 in [0, 1], digit-major (all samples of digit 0 first).
        prompts (`list[str]`): the `N` prompts.
        digits (`torch.Tensor`): the `N` prompted digits (int64), or the prompted pairs `(N, 2)` for pairs.
        seconds (`float`): wall-clock time of the pipeline calls (loading excluded).
        nfe_per_sample (`int`): network evaluations per sample; a classifier-free-guided step counts 2.
    """

    images: torch.Tensor
    prompts: list[str]
    digits: torch.Tensor
    seconds: float
    nfe_per_sample: int

    @property
    def samples_per_second(self) -> float:
        return len(self.images) / self.seconds


def load_pipeline(pipeline_or_path, trust_remote_code: bool = False):
    """A pipeline object as is, or `DiffusionPipeline.from_pretrained(path)` (fp32, CPU) for a folder or Hub id.

    `trust_remote_code=True` is needed for exported students whose `model_index.json` names the project's own
    pipeline file.
    """
    if not isinstance(pipeline_or_path, str | Path):
        return pipeline_or_path
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(pipeline_or_path), trust_remote_code=trust_remote_code)


def sample_images(
    pipeline,
    prompts: list[str],
    labels: torch.Tensor,
    height: int,
    width: int,
    num_inference_steps: int = 25,
    guidance_scale: float | None = 5.0,
    seed: int = 0,
    batch_size: int = 100,
    trust_remote_code: bool = False,
    progress: bool = True,
    desc: str = "sample",
    **pipeline_kwargs,
) -> DigitSamples:
    """Generate one image per prompt with fixed per-sample seeds (sample `i`: `manual_seed(seed + i)`).

    Args:
        pipeline (`DiffusionPipeline`, `str` or `Path`): a pipeline, or a folder / Hub id to load it from.
        prompts (`list[str]`): the `N` prompts.
        labels (`torch.Tensor`): what each prompt asks for (digits `(N,)` or pairs `(N, 2)`), kept in the result.
        height (`int`), width (`int`): image size in pixels.
        num_inference_steps (`int`, *optional*, defaults to 25): sampler steps.
        guidance_scale (`float`, *optional*, defaults to 5.0): classifier-free guidance scale; `None` passes none
            to the pipeline (for pipelines without the argument). A scale above 1 counts 2 NFE per step.
        seed (`int`, *optional*, defaults to 0): sample `i` uses `torch.Generator().manual_seed(seed + i)`.
        batch_size (`int`, *optional*, defaults to 100): samples per pipeline call.
        trust_remote_code (`bool`, *optional*, defaults to `False`): passed to `from_pretrained` for a path.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over batches, named `desc` (the
            pipeline's own bar is switched off).
        pipeline_kwargs: more arguments for the pipeline call.

    Returns:
        [`DigitSamples`]: images in [0, 1], prompts, labels, wall-clock seconds and NFE per sample.
    """
    pipeline = load_pipeline(pipeline, trust_remote_code=trust_remote_code)
    pipeline.set_progress_bar_config(disable=True)
    if guidance_scale is not None:
        pipeline_kwargs["guidance_scale"] = guidance_scale
    images, seconds = [], 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        batch_prompts = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch_prompts))]
        begin = time.perf_counter()
        output = pipeline(
            prompt=batch_prompts,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            generator=generators,
            output_type="pt",
            **pipeline_kwargs,
        )
        seconds += time.perf_counter() - begin
        images.append(output.images.float().cpu().clamp(0.0, 1.0))
    uses_cfg = guidance_scale is not None and guidance_scale > 1.0
    return DigitSamples(
        images=torch.cat(images),
        prompts=list(prompts),
        digits=labels,
        seconds=seconds,
        nfe_per_sample=num_inference_steps * (2 if uses_cfg else 1),
    )


def pair_sample_prompts(
    pairs: Sequence[tuple[int, int]] = HELD_OUT_PAIRS, num_per_pair: int = 4
) -> tuple[list[str], torch.Tensor]:
    """Pair-major prompts, `num_per_pair` per pair cycling through the phrasings, and the pairs `(N, 2)`."""
    prompts, labels = [], []
    for left, right in pairs:
        for index in range(num_per_pair):
            prompts.append(pair_prompt(left, right, index % len(PAIR_TEMPLATES)))
            labels.append((left, right))
    return prompts, torch.tensor(labels).reshape(-1, 2)


def sample_pairs(
    pipeline,
    pairs: Sequence[tuple[int, int]] = HELD_OUT_PAIRS,
    num_per_pair: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float | None = 3.0,
    seed: int = 0,
    **kwargs,
) -> DigitSamples:
    """`num_per_pair` 32 x 64 samples of every pair (pair-major), sample `i` from `manual_seed(seed + i)`.

    The result's `digits` are the prompted pairs, shape `(N, 2)`. Other arguments as for [`sample_images`].
    """
    prompts, labels = pair_sample_prompts(pairs, num_per_pair)
    kwargs.setdefault("desc", "sample pairs")
    return sample_images(
        pipeline,
        prompts,
        labels,
        height=PAIR_HEIGHT,
        width=PAIR_WIDTH,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        **kwargs,
    )
