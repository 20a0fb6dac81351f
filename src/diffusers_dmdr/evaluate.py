"""Score a diffusers text-to-image pipeline (a teacher or a DMDR student) with rewards on a prompt set.

```
python -m diffusers_dmdr.evaluate --pipeline <folder or Hub id> --prompts prompts.txt \
    --reward clip --reward hpsv2.1:prompt_prefix="Realistic photo " --output_dir eval/ --num_inference_steps 4
```

writes `results.json` (settings, per-reward mean and std, samples per second, every score), `results.md` (the same
table in markdown, ready for a model card) and `samples.png` (a grid of the first images).
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .rewards import LoadedReward, load_rewards, parse_reward_spec, validate_reward_specs


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EvaluationResult:
    r"""Scores of one pipeline on one prompt set.

    Args:
        pipeline (`str`): the pipeline's folder or Hub id.
        prompts (`list[str]`): the prompts, in generation order.
        scores (`dict[str, list[float]]`): per reward display name, one score per prompt.
        generation_seconds (`float`): wall time spent in the pipeline (rewards excluded).
        settings (`dict`): generation settings (steps, guidance, size, batch size, seed, dtype, device).
        reward_specs (`dict[str, str]`): per reward display name, its spec in CLI form.
    """

    pipeline: str
    prompts: list[str]
    scores: dict[str, list[float]]
    generation_seconds: float
    settings: dict = field(default_factory=dict)
    reward_specs: dict[str, str] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return len(self.prompts) / self.generation_seconds if self.generation_seconds > 0 else math.inf

    def summary(self) -> dict[str, dict[str, float]]:
        """Per reward: mean and sample standard deviation (0 for a single prompt)."""
        summary = {}
        for name, values in self.scores.items():
            values_tensor = torch.tensor(values, dtype=torch.float64)
            std = values_tensor.std().item() if len(values) > 1 else 0.0
            summary[name] = {"mean": values_tensor.mean().item(), "std": std}
        return summary

    def to_markdown(self) -> str:
        """A markdown table: one row per reward with mean and std, then the throughput."""
        lines = ["| reward | mean | std |", "|---|---:|---:|"]
        lines += [f"| {name} | {stats['mean']:.4f} | {stats['std']:.4f} |" for name, stats in self.summary().items()]
        settings = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        lines += [
            "",
            f"{len(self.prompts)} prompts, {self.samples_per_second:.3g} samples/s (generation only). "
            f"Pipeline `{self.pipeline}`; {settings}.",
        ]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {**asdict(self), "samples_per_second": self.samples_per_second, "summary": self.summary()}


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    prompts: list[str],
    rewards: list[LoadedReward],
    batch_size: int = 4,
    seed: int = 0,
    num_grid_images: int = 16,
    **generation_kwargs,
) -> tuple[EvaluationResult, torch.Tensor]:
    r"""Generate one image per prompt and score it with every reward.

    Args:
        pipeline (`DiffusionPipeline`): any text-to-image pipeline accepting `prompt`, `generator` and
            `output_type="pt"`.
        prompts (`list[str]`): the prompt set.
        rewards (`list[LoadedReward]`): from `load_rewards(..., for_training=False)`.
        batch_size (`int`, defaults to 4): prompts per pipeline call.
        seed (`int`, defaults to 0): batch `i` uses a CPU generator seeded `seed + i`, so results do not depend on
            the device or on other batches.
        num_grid_images (`int`, defaults to 16): how many of the first images to return for the grid.
        generation_kwargs: passed to the pipeline call (`num_inference_steps`, `guidance_scale`, `height`, ...).

    Returns:
        `(EvaluationResult, grid_images)` with `grid_images` a `(N, 3, H, W)` CPU tensor in [0, 1].
    """
    scores = {reward.name: [] for reward in rewards}
    grid_images, generation_seconds = [], 0.0
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch_prompts = prompts[start : start + batch_size]
        generator = torch.Generator("cpu").manual_seed(seed + batch_index)
        started = time.perf_counter()
        images = pipeline(prompt=batch_prompts, generator=generator, output_type="pt", **generation_kwargs).images
        generation_seconds += time.perf_counter() - started
        images = images.float().clamp(0, 1)
        for reward in rewards:
            scores[reward.name] += reward.fn(images, batch_prompts).tolist()
        if sum(len(batch) for batch in grid_images) < num_grid_images:
            grid_images.append(images.cpu())
    grid = torch.cat(grid_images)[:num_grid_images]
    result = EvaluationResult(
        pipeline=str(getattr(pipeline, "name_or_path", None) or type(pipeline).__name__),
        prompts=list(prompts),
        scores=scores,
        generation_seconds=generation_seconds,
        settings={"batch_size": batch_size, "seed": seed, **generation_kwargs},
        reward_specs={reward.name: reward.spec.to_text() for reward in rewards if reward.spec is not None},
    )
    return result, grid


def write_report(result: EvaluationResult, grid_images: torch.Tensor, output_dir: str | Path) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `samples.png` into `output_dir`; returns their paths."""
    from .utils import save_image_grid

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(result.to_markdown(), encoding="utf-8")
    if len(grid_images):
        rows = max(1, int(math.sqrt(len(grid_images))))
        paths["grid"] = save_image_grid(grid_images, output_dir / "samples.png", rows=rows)
    return paths


EVALUATION_HEADING = "## Evaluation"


def update_model_card(card_path: str | Path, result: "EvaluationResult") -> Path:
    """Put `result`'s table in the card's `## Evaluation` section, replacing an earlier one (re-runs stay clean)."""
    card_path = Path(card_path)
    text = card_path.read_text(encoding="utf-8")
    section = (
        f"{EVALUATION_HEADING}\n\nScored with `python -m diffusers_dmdr.evaluate`:\n\n{result.to_markdown().strip()}\n"
    )
    start = text.find(f"\n{EVALUATION_HEADING}\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(EVALUATION_HEADING) + 2)
        text = text[: start + 1] + section + (text[end:] if end != -1 else "")
    card_path.write_text(text, encoding="utf-8")
    return card_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .config import reward_names_epilog

    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dmdr.evaluate",
        description=__doc__.split("\n")[0],
        epilog=reward_names_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pipeline", required=True, help="pipeline folder or Hub id (DiffusionPipeline)")
    parser.add_argument(
        "--prompts", required=True, help=".txt (one per line), .json/.jsonl/.csv/.parquet or a Hub dataset"
    )
    parser.add_argument("--prompt_column", default=None, help="column of a tabular prompt file (default 'prompt')")
    parser.add_argument("--max_prompts", type=int, default=None, help="score only the first N prompts")
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        help="name[:weight][:key=value]..., repeatable, e.g. clip or hpsv2.1:prompt_prefix=Realistic photo ",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the pipeline's own")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--resolution", type=int, default=None, help="square output size (default: the pipeline's)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_grid_images", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="pipeline dtype; default bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="needed for exported DMDR student folders")
    parser.add_argument(
        "--update_model_card",
        action="store_true",
        help="write the table into the `## Evaluation` section of the local pipeline folder's README.md",
    )
    args = parser.parse_args(argv)
    if args.update_model_card and not (Path(args.pipeline) / "README.md").is_file():
        parser.error(f"--update_model_card needs a local pipeline folder with a README.md; {args.pipeline} has none.")
    if args.batch_size < 1 or args.num_grid_images < 0:
        parser.error("--batch_size must be >= 1 and --num_grid_images >= 0.")
    try:
        args.reward_specs = [parse_reward_spec(text) for text in args.reward]
        validate_reward_specs(args.reward_specs)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> EvaluationResult:
    # 1. Check everything cheap before any weights load.
    args = parse_args(argv)
    from .data import load_prompts

    try:
        prompts = load_prompts(args.prompts, prompt_column=args.prompt_column, max_samples=args.max_prompts)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {str(error).replace('--train_prompts', '--prompts')}") from error
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    # 2. Load the pipeline and the rewards (rewards in fp32 unless a spec sets `precision`: scores are the product).
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        args.pipeline, torch_dtype=dtype, trust_remote_code=args.trust_remote_code
    ).to(device)
    pipeline.set_progress_bar_config(disable=True)
    rewards = load_rewards(args.reward_specs, device, torch.float32, for_training=False)

    # 3. Generate, score, report.
    generation_kwargs = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    if args.resolution is not None:
        generation_kwargs.update(height=args.resolution, width=args.resolution)
    generation_kwargs = {key: value for key, value in generation_kwargs.items() if value is not None}
    result, grid_images = evaluate_pipeline(
        pipeline,
        prompts,
        rewards,
        batch_size=args.batch_size,
        seed=args.seed,
        num_grid_images=args.num_grid_images,
        **generation_kwargs,
    )
    result.pipeline = args.pipeline
    result.settings.update(dtype=str(dtype).removeprefix("torch."), device=str(device))
    paths = write_report(result, grid_images, args.output_dir)
    if args.update_model_card:
        paths["model_card"] = update_model_card(Path(args.pipeline) / "README.md", result)
    print(result.to_markdown())  # noqa: T201
    print(f"wrote {', '.join(str(path) for path in paths.values())}")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
