"""Score a diffusers text-to-image pipeline (a teacher or a DMDR student) with rewards on a prompt set, and compare
a student with its teacher in the same run.

```
python -m diffusers_dmdr.evaluate --pipeline <folder or Hub id> --prompts prompts.txt \
    --reward clip --reward hpsv2.1:prompt_prefix="Realistic photo " --output_dir eval/ [--teacher auto]
```

writes `results.json` (settings, per-reward mean and std, samples per second, every score), `results.md` (the same
table in markdown, ready for a model card) and `samples.png` (a grid of the first images). A diffusers-dmdr export
(full, or LoRA-only on its teacher) loads with the installed package, without `--trust_remote_code`. With
`--teacher <folder or Hub id>` (or `auto`: the teacher named by the export's `dmdr_config.yaml` or card), the teacher
is scored on the same prompts and seeds: the table has one column per pipeline and the grid a teacher row above a
student row, sampled from the same initial noise.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .rewards import LoadedReward, load_rewards, parse_reward_spec, validate_reward_specs
from .utils import DTYPES, resolve_dtype


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


@dataclass
class Comparison:
    r"""The teacher and the student scored on the same prompts and seeds.

    Args:
        teacher ([`EvaluationResult`]): the teacher's scores (its own steps and guidance unless set).
        student ([`EvaluationResult`]): the student's scores.
    """

    teacher: EvaluationResult
    student: EvaluationResult

    def to_markdown(self) -> str:
        """One row per reward: teacher and student mean +- std and the student's change; then the throughput."""
        teacher, student = self.teacher.summary(), self.student.summary()
        lines = ["| reward | teacher | student | student - teacher |", "|---|---:|---:|---:|"]
        for name, stats in student.items():
            reference = teacher[name]
            lines.append(
                f"| {name} | {reference['mean']:.4f} +- {reference['std']:.4f} | {stats['mean']:.4f} +- "
                f"{stats['std']:.4f} | {stats['mean'] - reference['mean']:+.4f} |"
            )
        lines.append(
            f"| samples/s (generation only) | {self.teacher.samples_per_second:.3g} | "
            f"{self.student.samples_per_second:.3g} | |"
        )
        lines.append("")
        for role, result in (("Teacher", self.teacher), ("Student", self.student)):
            settings = ", ".join(f"{key}={value}" for key, value in result.settings.items())
            lines.append(f"{role} `{result.pipeline}`: {settings}.")
        lines.append(f"\n{len(self.student.prompts)} prompts, the same seeds for both.")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        teacher, student = self.teacher.summary(), self.student.summary()
        difference = {name: student[name]["mean"] - teacher[name]["mean"] for name in student}
        return {"teacher": self.teacher.to_dict(), "student": self.student.to_dict(), "difference": difference}


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


def write_report(
    result: "EvaluationResult | Comparison",
    grid_images: torch.Tensor,
    output_dir: str | Path,
    grid_rows: int | None = None,
) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `samples.png` into `output_dir`; returns their paths. `grid_rows`
    defaults to a near-square grid (a comparison passes 2: the teacher row, then the student row)."""
    from .utils import save_image_grid

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(result.to_markdown(), encoding="utf-8")
    if len(grid_images):
        rows = grid_rows or max(1, int(math.sqrt(len(grid_images))))
        paths["grid"] = save_image_grid(grid_images, output_dir / "samples.png", rows=rows)
    return paths


def is_dmdr_export(source: str) -> bool:
    """Whether `source` (a folder or Hub id) is a diffusers-dmdr export: a full one (`model_index.json` names
    `FewStepDMDRPipeline`) or a LoRA-only one (the DMDR scheduler and the LoRA, no `model_index.json`)."""
    from .export_layout import LORA_WEIGHT_NAME, PIPELINE_CLASS, SCHEDULER_MODULE

    folder = Path(source).expanduser()
    if folder.is_dir():
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            return (folder / "scheduler" / f"{SCHEDULER_MODULE}.py").is_file() and (
                folder / LORA_WEIGHT_NAME
            ).is_file()
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    else:
        from diffusers import DiffusionPipeline

        class_name = DiffusionPipeline.load_config(source).get("_class_name")
    return (class_name[-1] if isinstance(class_name, list) else class_name) == PIPELINE_CLASS


def export_teacher(source: str) -> str:
    """The teacher of a diffusers-dmdr export folder: its recipe's `pretrained_model_name_or_path` when that still
    resolves here, else the Hub id its card names as `base_model`."""
    import yaml

    folder = Path(source).expanduser()
    recipe_file = folder / "dmdr_config.yaml"
    if recipe_file.is_file():
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        teacher = recipe.get("pretrained_model_name_or_path") or ""
        # An exported recipe names a local teacher `<local>/name`, and a folder of another machine does not resolve.
        if Path(teacher).expanduser().exists() or (teacher and not teacher.startswith(("/", "~", ".", "<local>"))):
            return teacher
        if recipe.get("base_model"):
            return recipe["base_model"]
    card_file = folder / "README.md"
    if card_file.is_file():
        from huggingface_hub import ModelCard

        base_model = ModelCard.load(card_file).data.to_dict().get("base_model")
        if base_model:
            return base_model if isinstance(base_model, str) else base_model[0]
    raise SystemExit(
        f"error: --teacher auto found no teacher for {source} (no usable pretrained_model_name_or_path in "
        "dmdr_config.yaml, no base_model in README.md); pass --teacher <folder or Hub id>."
    )


def load_pipeline(source: str, dtype: torch.dtype, trust_remote_code: bool = False, teacher: str | None = None):
    """Load `source` for evaluation: a diffusers-dmdr export with the installed package (no remote code; a LoRA-only
    export on its teacher), anything else with `DiffusionPipeline`."""
    from diffusers import DiffusionPipeline

    if not is_dmdr_export(source):
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    from .export_layout import LORA_WEIGHT_NAME
    from .pipelines import DMDRScheduler, FewStepDMDRPipeline

    folder = Path(source).expanduser()
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return FewStepDMDRPipeline.from_pretrained(source, dtype=dtype)
    # LoRA-only export: the teacher's components, the student's scheduler and LoRA.
    scheduler = DMDRScheduler.from_pretrained(source, subfolder="scheduler")
    teacher = teacher or export_teacher(source)
    pipeline = FewStepDMDRPipeline.from_pretrained(teacher, scheduler=scheduler, dtype=dtype)
    from .families import detect_family, get_family, read_teacher_config

    backbone_name = get_family(detect_family(read_teacher_config(teacher), teacher)).backbone_name
    backbone = getattr(pipeline, backbone_name)
    backbone.load_lora_adapter(source, weight_name=LORA_WEIGHT_NAME, prefix=backbone_name)
    backbone.fuse_lora()
    return pipeline


EVALUATION_HEADING = "## Evaluation"


def update_model_card(card_path: str | Path, result: "EvaluationResult | Comparison") -> Path:
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
    from .rewards import reward_names_epilog

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
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run a pipeline's own repository code (not needed for diffusers-dmdr exports: the package loads them)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="also score this teacher (folder or Hub id; `auto`: the one the export names) on the same prompts and "
        "seeds, and write one side-by-side table and grid",
    )
    parser.add_argument(
        "--teacher_num_inference_steps", type=int, default=None, help="teacher steps (default: the teacher's own)"
    )
    parser.add_argument(
        "--teacher_guidance_scale", type=float, default=None, help="teacher CFG scale (default: the teacher's own)"
    )
    parser.add_argument(
        "--update_model_card",
        action="store_true",
        help="write the table into the `## Evaluation` section of the local pipeline folder's README.md",
    )
    args = parser.parse_args(argv)
    if args.update_model_card and not (Path(args.pipeline) / "README.md").is_file():
        parser.error(f"--update_model_card needs a local pipeline folder with a README.md; {args.pipeline} has none.")
    if args.teacher == "auto" and not Path(args.pipeline).expanduser().is_dir():
        parser.error("--teacher auto reads the teacher from a local export folder; give --teacher <folder or Hub id>.")
    if args.batch_size < 1 or args.num_grid_images < 0:
        parser.error("--batch_size must be >= 1 and --num_grid_images >= 0.")
    try:
        args.reward_specs = [parse_reward_spec(text) for text in args.reward]
        validate_reward_specs(args.reward_specs)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> "EvaluationResult | Comparison":
    # 1. Check everything cheap before any weights load.
    args = parse_args(argv)
    from .data import load_prompts

    try:
        prompts = load_prompts(args.prompts, prompt_column=args.prompt_column, max_samples=args.max_prompts)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {str(error).replace('--train_prompts', '--prompts')}") from error
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))

    teacher = export_teacher(args.pipeline) if args.teacher == "auto" else args.teacher

    # 2. The rewards (fp32 unless a spec sets `precision`: scores are the product), then each pipeline in turn.
    rewards = load_rewards(args.reward_specs, device, torch.float32, for_training=False)
    student_kwargs = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    teacher_kwargs = {
        "num_inference_steps": args.teacher_num_inference_steps,
        "guidance_scale": args.teacher_guidance_scale,
    }
    size = {"height": args.resolution, "width": args.resolution} if args.resolution is not None else {}

    def score(source: str, generation_kwargs: dict, lora_teacher: str | None = None):
        pipeline = load_pipeline(source, dtype, args.trust_remote_code, teacher=lora_teacher).to(device)
        pipeline.set_progress_bar_config(disable=True)
        kwargs = {key: value for key, value in {**generation_kwargs, **size}.items() if value is not None}
        result, grid_images = evaluate_pipeline(
            pipeline,
            prompts,
            rewards,
            batch_size=args.batch_size,
            seed=args.seed,
            num_grid_images=args.num_grid_images,
            **kwargs,
        )
        del pipeline  # the next pipeline loads into the memory this one held
        result.pipeline = source
        result.settings.update(dtype=str(dtype).removeprefix("torch."), device=str(device))
        return result, grid_images

    # 3. Generate, score, report.
    result, grid_images = score(args.pipeline, student_kwargs, lora_teacher=teacher)
    grid_rows = None
    if teacher is not None:
        teacher_result, teacher_images = score(teacher, teacher_kwargs)
        # Teacher row above student row: image i of both rows comes from the same prompt and initial noise.
        count = min(len(teacher_images), len(grid_images))
        grid_images, grid_rows = torch.cat([teacher_images[:count], grid_images[:count]]), 2
        result = Comparison(teacher=teacher_result, student=result)
    paths = write_report(result, grid_images, args.output_dir, grid_rows=grid_rows)
    if args.update_model_card:
        paths["model_card"] = update_model_card(Path(args.pipeline) / "README.md", result)
    print(result.to_markdown())  # noqa: T201
    print(f"wrote {', '.join(str(path) for path in paths.values())}")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
