"""What `make demo` and `make reproduce` share: the training launch, the metrics row of a set of samples, the markdown
table, the teacher-vs-student grid and the training curves."""

import json
import sys
from pathlib import Path

import torch

from .build import DigitsTestbed, load_eval_classifier
from .metrics import evaluate_pairs
from .pairs import ALL_PAIRS, HELD_OUT_PAIRS
from .reward import DigitPairReward
from .sampling import DigitSamples


# Columns of the metrics table, in order, with their headers.
TABLE_COLUMNS = {
    "num_inference_steps": "steps",
    "guidance_scale": "CFG",
    "nfe_per_sample": "NFE",
    "pair_accuracy": "pair accuracy",
    "accuracy": "per-half accuracy",
    "reward": "reward (log p)",
    "fd": "FD",
    "precision": "precision",
    "recall": "recall",
    "diversity": "diversity",
    "samples_per_second": "samples/s",
}


def trainer_command(recipe: Path, extra_args: list[str] | None = None) -> list[str]:
    """The training subprocess: a single-process CPU `accelerate launch -m diffusers_dmdr.train` on `recipe`.

    It runs the installed module, so it works from a wheel as well as from a checkout.
    """
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
        "-m",
        "diffusers_dmdr.train",
        "--config",
        str(recipe),
        *(extra_args or []),
    ]


@torch.no_grad()
def mean_reward(reward: DigitPairReward, samples: DigitSamples) -> float:
    """Mean training reward (log-probability of the prompted pair) of generated samples."""
    rewards = [
        reward(samples.images[start : start + 256], samples.prompts[start : start + 256])
        for start in range(0, len(samples.images), 256)
    ]
    return float(torch.cat(rewards).mean())


def evaluate_row(
    samples: DigitSamples,
    testbed: DigitsTestbed,
    real_images: torch.Tensor,
    steps: int,
    guidance_scale: float | None = None,
) -> dict:
    """One row of the metrics table for pair `samples`: `evaluate_pairs` plus the training reward and the settings."""
    eval_classifier = load_eval_classifier(testbed.eval_weights)
    row = evaluate_pairs(eval_classifier, samples.images, samples.digits, samples.prompts, real_images)
    row["reward"] = mean_reward(DigitPairReward(model=testbed.reward_weights), samples)
    row.update(
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
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


def pair_grid(samples: DigitSamples, held_out=HELD_OUT_PAIRS, border: int = 1) -> torch.Tensor:
    """A `(3, 10 * (H + 2b), 10 * (W + 2b))` grid of one sample per ordered pair: row = left digit, column = right
    digit. Held-out pairs get a red border, the others a grey one. `samples` must hold every pair of `ALL_PAIRS`."""
    height, width = samples.images.shape[-2:]
    cell = torch.zeros(3, height + 2 * border, width + 2 * border)
    grid = torch.zeros(3, 10 * cell.shape[1], 10 * cell.shape[2])
    index = {tuple(pair): i for i, pair in enumerate(samples.digits.tolist())}
    missing = [pair for pair in ALL_PAIRS if pair not in index]
    if missing:
        raise ValueError(f"The grid needs a sample of every pair; missing {missing[:5]}...")
    for left, right in ALL_PAIRS:
        framed = cell.clone()
        framed[:] = torch.tensor([0.9, 0.1, 0.1] if (left, right) in held_out else [0.35] * 3)[:, None, None]
        framed[:, border : border + height, border : border + width] = samples.images[index[(left, right)]]
        top, leftmost = left * cell.shape[1], right * cell.shape[2]
        grid[:, top : top + cell.shape[1], leftmost : leftmost + cell.shape[2]] = framed
    return grid


def save_comparison_grid(rows: dict[str, DigitSamples], path: Path) -> Path:
    """A PNG with one 10 x 10 pair grid per model (`pair_grid`), side by side, all from the same noise per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(7.5 * len(rows), 4.4))
    axes = [axes] if len(rows) == 1 else list(axes)
    for axis, (name, samples) in zip(axes, rows.items(), strict=True):
        axis.imshow(pair_grid(samples).permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(f"{name}: {samples.nfe_per_sample} NFE (row: left digit, column: right; red: held out)")
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


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
