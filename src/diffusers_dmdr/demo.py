"""`make demo`: distil the digits teacher into a 4-step student on a CPU and compare the two.

```
python -m diffusers_dmdr.demo --output_dir outputs/demo
```

1. Build (or reuse from the cache) the digits testbed: teacher pipeline, reward and evaluation classifiers, prompts.
2. Write the run's recipe: `examples/train_dmdr/configs/digits.yaml` with the testbed's paths filled in.
3. Train: `accelerate launch examples/train_dmdr/train.py --config <recipe>` in a subprocess (`trainer_command`).
4. Evaluate teacher and student on the same noise: a metrics table (markdown and JSON), a PNG grid of both for every
   digit, and PNG plots of the losses and rewards logged during training.

Outputs in `--output_dir`: `student/` (the exported Hub-ready pipeline and its model card), `digits_recipe.yaml`,
`metrics.md`, `metrics.json`, `samples_teacher_vs_student.png`, `training_losses.png`, `training_rewards.png`.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .digits import (
    TEACHER_GUIDANCE_SCALE,
    TEACHER_NUM_INFERENCE_STEPS,
    DigitClassifierReward,
    DigitSamples,
    build_testbed,
    evaluate_digits,
    load_digit_splits,
    load_eval_classifier,
    sample_digits,
)
from .digits.build import DigitsTestbed, evaluate_real_reference


logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_dmdr" / "train.py"
DIGITS_RECIPE = REPO_ROOT / "examples" / "train_dmdr" / "configs" / "digits.yaml"
REWARD_CLASS = "diffusers_dmdr.digits.reward.DigitClassifierReward"
# Columns of the metrics table, in order, with their headers.
TABLE_COLUMNS = {
    "num_inference_steps": "steps",
    "nfe_per_sample": "NFE",
    "accuracy": "accuracy",
    "reward": "reward (log p)",
    "fd": "FD",
    "precision": "precision",
    "recall": "recall",
    "diversity": "diversity",
    "samples_per_second": "samples/s",
}


def write_recipe(recipe: Path, testbed: DigitsTestbed, output_dir: Path, overrides: dict | None = None) -> Path:
    """Copy `recipe` to `output_dir/digits_recipe.yaml` with the testbed's teacher, prompts and reward weights."""
    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    values["pretrained_model_name_or_path"] = str(testbed.teacher_dir)
    values["train_prompts"] = str(testbed.prompts_file)
    values["output_dir"] = str(output_dir / "student")
    for spec in values.get("reward", []):
        if isinstance(spec, dict) and spec.get("name") == REWARD_CLASS:
            spec["model"] = str(testbed.reward_weights)
    values.update(overrides or {})
    path = output_dir / "digits_recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def trainer_command(recipe: Path, train_script: Path = TRAIN_SCRIPT, extra_args: list[str] | None = None) -> list[str]:
    """The training subprocess: a single-process CPU `accelerate launch` of the example script on `recipe`."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(train_script),
        "--config",
        str(recipe),
        *(extra_args or []),
    ]


@torch.no_grad()
def mean_reward(reward: DigitClassifierReward, samples: DigitSamples) -> float:
    """Mean reward (log-probability of the prompted digit) of generated samples."""
    rewards = [
        reward(samples.images[start : start + 256], samples.prompts[start : start + 256])
        for start in range(0, len(samples.images), 256)
    ]
    return float(torch.cat(rewards).mean())


def evaluate_row(samples: DigitSamples, testbed: DigitsTestbed, real_images: torch.Tensor, steps: int) -> dict:
    """One row of the metrics table for `samples`."""
    eval_classifier = load_eval_classifier(testbed.eval_weights)
    row = evaluate_digits(eval_classifier, samples.images, samples.digits, samples.prompts, real_images)
    row["reward"] = mean_reward(DigitClassifierReward(model=testbed.reward_weights), samples)
    row.update(
        num_inference_steps=steps,
        nfe_per_sample=samples.nfe_per_sample,
        samples_per_second=samples.samples_per_second,
        num_samples=len(samples.images),
    )
    return row


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table with one line per model and the columns of `TABLE_COLUMNS`."""
    lines = ["| model | " + " | ".join(TABLE_COLUMNS.values()) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for key in TABLE_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_comparison_grid(rows: dict[str, DigitSamples], path: Path, num_per_digit: int, columns_per_digit: int = 3):
    """A PNG grid: for each model, a block of `columns_per_digit` samples per digit, all from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 1, figsize=(7, (0.7 * columns_per_digit + 0.5) * len(rows)))
    axes = [axes] if len(rows) == 1 else list(axes)
    for axis, (name, samples) in zip(axes, rows.items(), strict=True):
        blocks = []
        for row in range(columns_per_digit):
            index = [digit * num_per_digit + row for digit in range(10)]
            blocks.append(torch.cat(list(samples.images[index]), dim=-1))
        grid = torch.cat(blocks, dim=-2).permute(1, 2, 0).numpy()
        axis.imshow(grid, interpolation="nearest")
        axis.set_title(f"{name}: {samples.nfe_per_sample} NFE per sample (columns: digits 0-9, same noise)")
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def read_training_curves(student_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The per-step logs of a training run as `{name: (steps, values)}`.

    Read from the `history` of the export's `train_summary.json`, or else from the TensorBoard event files under
    `student_dir`.
    """
    summary = student_dir / "train_summary.json"
    curves: dict[str, tuple[list[int], list[float]]] = {}
    if summary.is_file():
        for entry in json.loads(summary.read_text()).get("history", []):
            for name, value in entry.items():
                if name != "step" and isinstance(value, int | float):
                    steps, values = curves.setdefault(name, ([], []))
                    steps.append(entry["step"])
                    values.append(value)
        return curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for event_file in sorted(student_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps, values = curves.setdefault(tag, ([], []))
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return curves


def plot_training_curves(scalars: dict[str, tuple[list[int], list[float]]], path: Path, prefix: str) -> Path | None:
    """One PNG plot of every logged scalar whose tag starts with `prefix`, against the generator step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted(tag for tag in scalars if tag.startswith(prefix))
    if not tags:
        return None
    figure, axes = plt.subplots(len(tags), 1, figsize=(7, 2.2 * len(tags)), sharex=True, squeeze=False)
    for axis, tag in zip(axes[:, 0], tags, strict=True):
        axis.plot(*scalars[tag], linewidth=1)
        axis.set_ylabel(tag)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("generator step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusers_dmdr.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--cache_dir", default=None, help="testbed cache (default: ~/.cache/diffusers_dmdr/digits)")
    parser.add_argument("--recipe", default=str(DIGITS_RECIPE), help="the DMDR recipe to train with")
    parser.add_argument("--train_script", default=str(TRAIN_SCRIPT))
    parser.add_argument("--skip_training", action="store_true", help="evaluate an existing <output_dir>/student")
    parser.add_argument("--num_per_digit", type=int, default=40, help="samples per digit for the metrics")
    parser.add_argument("--teacher_steps", type=int, default=TEACHER_NUM_INFERENCE_STEPS)
    parser.add_argument("--teacher_guidance_scale", type=float, default=TEACHER_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=1000, help="first noise seed of the evaluation samples")
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch CPU threads here and in training (default: all cores)"
    )
    args, extra_train_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
        train_env["OMP_NUM_THREADS"] = str(args.num_threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds, start = {}, time.perf_counter()

    # 1. The testbed.
    testbed = build_testbed(args.cache_dir)
    if not testbed.gate_passed:
        raise SystemExit(
            f"The digits teacher at {testbed.teacher_dir} misses its quality gate; rebuild it with --force."
        )
    seconds["testbed"] = time.perf_counter() - start

    # 2-3. The recipe and the training run (extra command-line arguments go to train.py).
    student_dir = output_dir / "student"
    if not args.skip_training:
        recipe = write_recipe(Path(args.recipe), testbed, output_dir)
        command = trainer_command(recipe, Path(args.train_script), extra_train_args)
        logger.info("Training: %s", " ".join(command))
        begin = time.perf_counter()
        subprocess.run(command, check=True, env=train_env)
        seconds["training"] = time.perf_counter() - begin

    # 4. Teacher and student on the same noise, then the table, the grid and the training curves.
    begin = time.perf_counter()
    splits = load_digit_splits()
    real_images = splits["real"][0]
    sampling = {"num_per_digit": args.num_per_digit, "seed": args.seed}
    teacher_samples = sample_digits(
        testbed.teacher_dir,
        num_inference_steps=args.teacher_steps,
        guidance_scale=args.teacher_guidance_scale,
        **sampling,
    )
    student_config = yaml.safe_load((output_dir / "digits_recipe.yaml").read_text())
    student_steps = student_config.get("num_student_steps", 4)
    student_samples = sample_digits(
        student_dir, num_inference_steps=student_steps, guidance_scale=None, trust_remote_code=True, **sampling
    )
    rows = {
        f"teacher ({args.teacher_steps} steps, CFG {args.teacher_guidance_scale:g})": evaluate_row(
            teacher_samples, testbed, real_images, args.teacher_steps
        ),
        f"student ({student_steps} steps)": evaluate_row(student_samples, testbed, real_images, student_steps),
        # Same sample count as the generated rows: FD's bias depends on it.
        "real digits (reference)": evaluate_real_reference(
            load_eval_classifier(testbed.eval_weights), splits, args.num_per_digit
        ),
    }
    seconds["evaluation"] = time.perf_counter() - begin
    seconds["total"] = time.perf_counter() - start
    (output_dir / "metrics.md").write_text(format_table(rows), encoding="utf-8")
    (output_dir / "metrics.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")
    save_comparison_grid(
        {"teacher": teacher_samples, "student": student_samples},
        output_dir / "samples_teacher_vs_student.png",
        args.num_per_digit,
    )
    scalars = read_training_curves(student_dir)
    plot_training_curves(scalars, output_dir / "training_losses.png", "loss")
    plot_training_curves(scalars, output_dir / "training_rewards.png", "reward")
    print(format_table(rows))  # noqa: T201
    print(f"demo outputs in {output_dir} ({seconds['total'] / 60:.1f} min)")  # noqa: T201


if __name__ == "__main__":
    main()
