"""`make demo`: distil the digit-pairs teacher into a 4-step student on a CPU and compare the two on held-out pairs.

```
python -m diffusers_dmdr.demo --output_dir outputs/demo
```

1. Build (or reuse from the cache) the digit-pairs testbed: teacher pipeline, reward and evaluation classifiers,
   prompts (`diffusers_dmdr.digits`).
2. Write the run's recipe (`diffusers_dmdr.digits.recipe`, built in code) with the testbed's paths filled in.
3. Train: `accelerate launch -m diffusers_dmdr.train --config <recipe>` in a subprocess (the installed module).
4. Evaluate teacher and student on the held-out pairs with the same noise: a metrics table (markdown and JSON), the
   prompts with their digits, a teacher-vs-student grid of every pair once, and plots of the training logs.

Outputs in `--output_dir`: `student/` (the exported Hub-ready pipeline and its model card), `digits_recipe.yaml`,
`metrics.md`, `metrics.json`, `prompts.json`, `samples_teacher_vs_student.png`, `training_losses.png`,
`training_rewards.png`. Everything runs on one torch thread per process by default (`--num_threads`): on a shared
2-core machine two threads ran 10-20x slower.
"""

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .cli import DEBUG_FLAG, DEBUG_HELP, run_entry_point
from .digits import (
    HELD_OUT_PAIRS,
    PAIR_HEIGHT,
    PAIR_WIDTH,
    TEACHER_GUIDANCE_SCALE,
    TEACHER_NUM_INFERENCE_STEPS,
    TEACHER_PAIR_ACCURACY_BAND,
    build_testbed,
    load_digit_splits,
    load_eval_classifier,
    sample_pairs,
)
from .digits.build import evaluate_real_reference, load_real_pairs_from
from .digits.pairs import ALL_PAIRS
from .digits.recipe import rl_overrides, write_recipe
from .digits.report import (
    evaluate_row,
    format_table,
    plot_training_curves,
    read_training_curves,
    save_comparison_grid,
    trainer_command,
)
from .digits.sampling import pair_sample_prompts


logger = logging.getLogger(__name__)

# Stages of the demo, for the stage bar.
DEMO_STAGES = ("testbed", "training", "evaluation", "report")
# The headline target of issue 12 (reported whatever it is): DMDR student pair accuracy minus the teacher's.
TARGET_ACCURACY_GAIN = 0.10


def prompts_record(num_per_pair: int, seed: int, grid_seed: int) -> list[dict]:
    """`prompts.json`: every prompt the demo sampled, with its two digits, its noise seed and what it was for."""
    records = []
    prompts, pairs = pair_sample_prompts(HELD_OUT_PAIRS, num_per_pair)
    for index, (prompt, (left, right)) in enumerate(zip(prompts, pairs.tolist(), strict=True)):
        records.append(
            {
                "prompt": prompt,
                "left": left,
                "right": right,
                "held_out": True,
                "noise_seed": seed + index,
                "use": "metrics",
            }
        )
    prompts, pairs = pair_sample_prompts(ALL_PAIRS, 1)
    for index, (prompt, (left, right)) in enumerate(zip(prompts, pairs.tolist(), strict=True)):
        records.append(
            {
                "prompt": prompt,
                "left": left,
                "right": right,
                "held_out": (left, right) in HELD_OUT_PAIRS,
                "noise_seed": grid_seed + index,
                "use": "grid",
            }
        )
    return records


def headline(rows: dict, teacher_name: str, student_name: str) -> str:
    """One sentence: the student's held-out pair accuracy against the teacher's and the target."""
    teacher, student = rows[teacher_name]["pair_accuracy"], rows[student_name]["pair_accuracy"]
    gain = student - teacher
    verdict = "meets" if gain >= TARGET_ACCURACY_GAIN else "misses"
    return (
        f"Held-out pair accuracy: student {student:.3f}, teacher {teacher:.3f} ({100 * gain:+.1f} points; the target "
        f"of +{100 * TARGET_ACCURACY_GAIN:.0f} points: {verdict}). One training seed (`--training_seed` picks "
        "another; `--cold_start_steps <max_train_steps>` trains the DMD-only student); docs/digits.md has three "
        "seeds of both.\n"
    )


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dmdr.demo",
        description=__doc__.split("\n")[0],
        epilog="Any other flag goes to the trainer (`dmdr-train --help` lists them), e.g. --cold_start_steps 500.",
    )
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--cache_dir", default=None, help="testbed cache (default: ~/.cache/diffusers_dmdr/digits)")
    parser.add_argument("--skip_training", action="store_true", help="evaluate an existing <output_dir>/student")
    parser.add_argument("--num_per_pair", type=int, default=8, help="samples per held-out pair for the metrics")
    parser.add_argument("--teacher_steps", type=int, default=TEACHER_NUM_INFERENCE_STEPS)
    parser.add_argument("--teacher_guidance_scale", type=float, default=TEACHER_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=1000, help="first noise seed of the evaluation samples")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads here and in training")
    parser.add_argument(
        "--training_seed", type=int, default=None, help="the trainer's seed, written into the recipe (default: 0)"
    )
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="generator updates of the training run (default: the digits recipe's 500); a shorter run finishes "
        "sooner with a smaller gain",
    )
    parser.add_argument(
        "--rl",
        choices=("refl", "grpo", "dpo"),
        default="refl",
        help="stage 2's RL: reward back-propagation through the torch pair classifier (refl), or GRPO / DPO on a "
        "scikit-learn pair scorer without gradients (docs/rl.md)",
    )
    parser.add_argument(
        "--rl_regularizer", choices=("dmd", "kl", "none"), default="dmd", help="GRPO / DPO: the stage-2 regulariser"
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    """`make demo`; the project's errors end as one line (`cli.run_entry_point`)."""
    run_entry_point("python -m diffusers_dmdr.demo", _demo, argv)


def _demo(argv: list[str]) -> None:
    args, extra_train_args = build_argument_parser().parse_known_args(argv)
    if args.max_train_steps is not None:
        extra_train_args = [*extra_train_args, "--max_train_steps", str(args.max_train_steps)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.num_threads)
    train_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.num_threads)}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds, start = {}, time.perf_counter()
    stages = tqdm(
        total=len(DEMO_STAGES), desc="make demo", bar_format="{desc}: stage {n_fmt}/{total_fmt}{postfix} [{elapsed}]"
    )

    def stage(name: str, detail: str) -> None:
        stages.set_postfix_str(f"{name}: {detail}")
        stages.refresh()

    # 1. The testbed.
    stage("testbed", "build or reuse (a fresh build shows its own bars with ETAs)")
    testbed = build_testbed(args.cache_dir)
    low, high = TEACHER_PAIR_ACCURACY_BAND
    band_note = ""
    if not testbed.gate_passed:
        # Not fatal (the distillation itself is still meaningful), but stated everywhere the numbers go.
        band_note = (
            f"WARNING: the teacher's held-out pair accuracy at build time, "
            f"{testbed.report['teacher_gate']['pair_accuracy']:.3f}, is outside the band {low}-{high} that issue 12 "
            "asks for; choose its budget with `python -m diffusers_dmdr.digits --budget_curve ...` (docs/digits.md)."
        )
        logger.warning(band_note)
    seconds["testbed"] = time.perf_counter() - start
    stages.update(1)

    # 2-3. The recipe and the training run (extra command-line arguments go to the trainer).
    student_dir = output_dir / "student"
    recipe = output_dir / "digits_recipe.yaml"
    if not args.skip_training:
        stage("training", "DMD cold start, then DMD + reward (ETA on the trainer's bar)")
        overrides = rl_overrides(args.rl, args.rl_regularizer)
        if args.training_seed is not None:
            overrides["seed"] = args.training_seed
        recipe = write_recipe(testbed, output_dir, student_dir, overrides)
        command = trainer_command(recipe, extra_train_args)
        logger.info("Training: %s", " ".join(command))
        begin = time.perf_counter()
        completed = subprocess.run(command, env=train_env)
        if completed.returncode != 0:
            # The trainer printed its own error (one line for a bad input); no second traceback here.
            raise SystemExit(f"python -m diffusers_dmdr.demo: error: training failed (exit {completed.returncode}).")
        seconds["training"] = time.perf_counter() - begin
    stages.update(1)

    # 4. Teacher and student on the same noise: metrics on the held-out pairs, then every pair once for the grid.
    stage("evaluation", "teacher (50 steps, CFG) and student on the held-out pairs")
    begin = time.perf_counter()
    splits = load_digit_splits()
    real_images = load_real_pairs_from(splits)
    student_steps = yaml.safe_load(recipe.read_text())["num_student_steps"]
    teacher_sampling = {"num_inference_steps": args.teacher_steps, "guidance_scale": args.teacher_guidance_scale}
    student_sampling = {"num_inference_steps": student_steps, "guidance_scale": None, "trust_remote_code": True}
    common = {"num_per_pair": args.num_per_pair, "seed": args.seed, "desc": "sample held-out pairs"}
    teacher_samples = sample_pairs(testbed.teacher_dir, HELD_OUT_PAIRS, **teacher_sampling, **common)
    student_samples = sample_pairs(student_dir, HELD_OUT_PAIRS, **student_sampling, **common)
    teacher_name = f"teacher ({args.teacher_steps} steps, CFG {args.teacher_guidance_scale:g})"
    variant = "" if args.rl == "refl" else f", {args.rl.upper()} + {args.rl_regularizer.upper()}"
    student_name = f"DMDR student ({student_steps} steps{variant})"
    rows = {
        teacher_name: evaluate_row(
            teacher_samples, testbed, real_images, args.teacher_steps, args.teacher_guidance_scale
        ),
        student_name: evaluate_row(student_samples, testbed, real_images, student_steps),
        # Same sample count as the generated rows: FD's bias depends on it.
        "real pairs (reference)": evaluate_real_reference(
            load_eval_classifier(testbed.eval_weights), splits, args.num_per_pair
        ),
    }
    grid_seed = args.seed + 100_000
    grid = {"num_per_pair": 1, "seed": grid_seed, "desc": "sample every pair", "progress": False}
    grid_samples = {
        "teacher": sample_pairs(testbed.teacher_dir, ALL_PAIRS, **teacher_sampling, **grid),
        "DMDR student": sample_pairs(student_dir, ALL_PAIRS, **student_sampling, **grid),
    }
    seconds["evaluation"] = time.perf_counter() - begin
    stages.update(1)

    # 5. The report files.
    stage("report", "metrics, prompts, grid, curves")
    seconds["total"] = time.perf_counter() - start
    size = {"height": PAIR_HEIGHT, "width": PAIR_WIDTH}
    sampling = {
        teacher_name: {**teacher_sampling, **size, "pipeline": str(testbed.teacher_dir)},
        student_name: {**student_sampling, **size, "pipeline": str(student_dir)},
    }
    for name, settings in sampling.items():
        settings.update(
            first_noise_seed=args.seed, noise="sample i: torch.Generator().manual_seed(first_noise_seed + i)"
        )
        rows[name]["sampling"] = settings
    summary = {
        "teacher_dir": str(testbed.teacher_dir),
        "student_dir": str(student_dir),
        "testbed": str(testbed.root),
        "eval_classifier": str(testbed.eval_weights),
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "rows": rows,
        "pair_accuracy_gain": rows[student_name]["pair_accuracy"] - rows[teacher_name]["pair_accuracy"],
        "teacher_in_accuracy_band": testbed.gate_passed,
        "seconds": seconds,
        "torch_num_threads": args.num_threads,
    }
    table = format_table(rows)
    text = headline(rows, teacher_name, student_name) + (f"\n{band_note}\n" if band_note else "")
    (output_dir / "metrics.md").write_text(
        "# make demo: teacher vs 4-step DMDR student on the held-out digit pairs\n\n" + table + "\n" + text,
        encoding="utf-8",
    )
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "prompts.json").write_text(
        json.dumps(prompts_record(args.num_per_pair, args.seed, grid_seed), indent=1) + "\n"
    )
    save_comparison_grid(grid_samples, output_dir / "samples_teacher_vs_student.png")
    scalars = read_training_curves(student_dir)
    plot_training_curves(scalars, output_dir / "training_losses.png", "loss")
    plot_training_curves(scalars, output_dir / "training_rewards.png", "reward")
    stages.update(1)
    stages.close()
    print(table + "\n" + text)  # noqa: T201
    print(f"demo outputs in {output_dir} ({seconds['total'] / 60:.1f} min)")  # noqa: T201


if __name__ == "__main__":
    main()
