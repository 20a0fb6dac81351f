"""`make reproduce-rl`: issue 22's comparison of ReFL, GRPO and DPO on the digit pairs, over training seeds.

```
python -m diffusers_dmdr.digits.rl_comparison --output_dir outputs/rl_comparison --docs docs/rl_runs/table.md
```

Every arm is the full `make demo` recipe (`python -m diffusers_dmdr.demo`: 60 DMD cold-start steps, then 440
stage-2 steps; the demo's evaluation on the held-out pairs, the same noise for every row), run once per training seed
in its own folder `<output_dir>/<arm>_seed<s>/`. The arms:

- `dmd_only`: DMD for all 500 steps (no RL), the FD reference of the issue's 1.2x limit;
- `refl`: the recipe itself, DMD + reward back-propagation through the torch pair classifier;
- `grpo_dmd`, `grpo_kl`, `grpo_none`: GRPO on the scikit-learn pair scorer (no gradients), regularised by DMD, by
  Flow-GRPO's KL to the stage-1 student, or by nothing;
- `dpo_dmd`: Diffusion-DPO on the best and worst of each group, regularised by DMD;
- the sweeps (`--arms` names them; not run by default): `grpo_dmd_w10`, `grpo_dmd_w30` (the GRPO weight lambda),
  `grpo_kl_w0.4`, `grpo_kl_w4` (the KL weight), `grpo_dmd_ie2` (2 inner epochs per rollout),
  `grpo_dmd_ie2_clip1e-2` (the same with the clip range at 1e-2), `grpo_dmd_all`, `grpo_dmd_all_w10`, `grpo_kl_all`,
  `grpo_none_all` (`--rl_transitions all`: every stochastic transition of each rollout trains), `grpo_dmd_g8`,
  `grpo_dmd_b32`, `grpo_dmd_b32_w10` (more rollouts per update), `grpo_dmd_logp` (the scorer's pair log-probability
  as the reward).

A run whose folder already holds `metrics.json` is reused (`--force` reruns it); `--collect_only` only reads the
folders. The table ranks the arms by mean held-out pair accuracy, with the spread over seeds, FD against the DMD-only
student's, precision, recall, the training reward at the start and the end of stage 2 (a reward that rises while
held-out accuracy falls is reward hacking), wall time and network evaluations per generator update. Each run takes
5-10 minutes on a free core: the default 6 arms x 3 seeds are about 1.5-3 hours with `--jobs 2`.
"""

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .claims import ACCURACY_GAIN_TARGET, FD_RATIO_LIMIT
from .recipe import DIGITS_RECIPE, SCORER_CLASS
from .reproduce_report import mean_std


@dataclass(frozen=True)
class RLArm:
    """One arm of the comparison: its label and the demo's command-line arguments that select it."""

    label: str
    demo_args: tuple[str, ...] = ()
    sweep: bool = False


GRPO = ("--rl", "grpo")
ARMS = {
    "dmd_only": RLArm("DMD only (no RL)", ("--cold_start_steps", str(DIGITS_RECIPE["max_train_steps"]))),
    "refl": RLArm("DMD + ReFL (the recipe)"),
    "grpo_dmd": RLArm("DMD + GRPO", (*GRPO, "--rl_regularizer", "dmd")),
    "grpo_kl": RLArm("GRPO + KL (Flow-GRPO's)", (*GRPO, "--rl_regularizer", "kl")),
    "grpo_none": RLArm("GRPO alone", (*GRPO, "--rl_regularizer", "none")),
    "dpo_dmd": RLArm("DMD + DPO", ("--rl", "dpo", "--rl_regularizer", "dmd")),
    "grpo_dmd_w10": RLArm("DMD + GRPO, lambda 10", (*GRPO, "--rl_regularizer", "dmd", "--rl_weight", "10"), True),
    "grpo_dmd_w30": RLArm("DMD + GRPO, lambda 30", (*GRPO, "--rl_regularizer", "dmd", "--rl_weight", "30"), True),
    "grpo_kl_w0.4": RLArm("GRPO + KL", (*GRPO, "--rl_regularizer", "kl", "--rl_kl_weight", "0.4"), True),
    "grpo_kl_w4": RLArm("GRPO + KL", (*GRPO, "--rl_regularizer", "kl", "--rl_kl_weight", "4"), True),
    "grpo_dmd_ie2": RLArm(
        "DMD + GRPO, 2 inner epochs", (*GRPO, "--rl_regularizer", "dmd", "--rl_inner_epochs", "2"), True
    ),
    # Every stochastic transition of each rollout trains (Flow-GRPO's whole trajectory), not only the drawn one.
    "grpo_dmd_all": RLArm(
        "DMD + GRPO, every transition", (*GRPO, "--rl_regularizer", "dmd", "--rl_transitions", "all"), True
    ),
    "grpo_dmd_all_w10": RLArm(
        "DMD + GRPO, every transition, lambda 10",
        (*GRPO, "--rl_regularizer", "dmd", "--rl_transitions", "all", "--rl_weight", "10"),
        True,
    ),
    "grpo_kl_all": RLArm(
        "GRPO + KL, every transition", (*GRPO, "--rl_regularizer", "kl", "--rl_transitions", "all"), True
    ),
    "grpo_none_all": RLArm(
        "GRPO alone, every transition", (*GRPO, "--rl_regularizer", "none", "--rl_transitions", "all"), True
    ),
    # More rollouts per update: groups of 8 (2 prompts x 8 noises), or a batch of 32 (8 groups of 4).
    "grpo_dmd_g8": RLArm("DMD + GRPO, groups of 8", (*GRPO, "--rl_regularizer", "dmd", "--rl_group_size", "8"), True),
    "grpo_dmd_b32": RLArm(
        "DMD + GRPO, batch 32 (8 groups)", (*GRPO, "--rl_regularizer", "dmd", "--train_batch_size", "32"), True
    ),
    "grpo_dmd_b32_w10": RLArm(
        "DMD + GRPO, batch 32, lambda 10",
        (*GRPO, "--rl_regularizer", "dmd", "--train_batch_size", "32", "--rl_weight", "10"),
        True,
    ),
    # A sharper reward: the scorer's log-probability of the pair (what the torch reward of ReFL computes).
    "grpo_dmd_logp": RLArm(
        "DMD + GRPO, reward: the scorer's pair log-probability",
        (*GRPO, "--rl_regularizer", "dmd", "--reward", f"{SCORER_CLASS}:1.0:mode=log_probability"),
        True,
    ),
    # The clip range scaled to the ratio's per-step change on this testbed (~4e-3 rms after one step, docs/rl.md).
    "grpo_dmd_ie2_clip1e-2": RLArm(
        "DMD + GRPO, 2 inner epochs, clip 1e-2",
        (*GRPO, "--rl_regularizer", "dmd", "--rl_inner_epochs", "2", "--rl_clip_range", "1e-2"),
        True,
    ),
}
DEFAULT_ARMS = [name for name, arm in ARMS.items() if not arm.sweep]
TEACHER_ROW_PREFIX = "teacher"
REAL_ROW = "real pairs (reference)"
CONFIG_FILE = "dmdr_config.yaml"
CURVE_FILE = "reward_curve.json"
REWARD_KEY = "rl/reward_mean"
# Stage-2 steps averaged for the training reward at the start and at the end of stage 2.
REWARD_WINDOW = 50


def run_folder(output_dir: Path, arm: str, seed: int) -> Path:
    return Path(output_dir) / f"{arm}_seed{seed}"


def demo_command(
    arm: str, seed: int, output_dir: Path, max_train_steps: int | None = None, train_args: tuple[str, ...] = ()
) -> list[str]:
    """The `python -m diffusers_dmdr.demo` command of one arm and training seed (one torch thread).

    `max_train_steps` (default: the recipe's 500) lengthens stage 2 for every arm (the DMD-only arm's cold start
    spans the whole run); `train_args` are trainer flags every arm gets (e.g. `--rl_weight 10`), after the arm's own.
    """
    folder = run_folder(output_dir, arm, seed)
    arm_args = list(ARMS[arm].demo_args)
    if max_train_steps is not None:
        if arm_args[:1] == ["--cold_start_steps"]:
            arm_args[1] = str(max_train_steps)
        arm_args += ["--max_train_steps", str(max_train_steps)]
    return [
        sys.executable,
        "-m",
        "diffusers_dmdr.demo",
        *arm_args,
        *train_args,
        "--training_seed",
        str(seed),
        "--num_threads",
        "1",
        "--output_dir",
        str(folder),
    ]


def run_arm(
    arm: str,
    seed: int,
    output_dir: Path,
    force: bool = False,
    max_train_steps: int | None = None,
    train_args: tuple[str, ...] = (),
) -> Path:
    """Run one arm and seed unless its `metrics.json` exists; the demo's log goes to `run.log` in its folder."""
    folder = run_folder(output_dir, arm, seed)
    if (folder / "metrics.json").is_file() and not force:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    command = demo_command(arm, seed, output_dir, max_train_steps, train_args)
    begin = time.perf_counter()
    with open(folder / "run.log", "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise SystemExit(
            f"python -m diffusers_dmdr.digits.rl_comparison: error: {arm} seed {seed} failed "
            f"(exit {completed.returncode}); see {folder / 'run.log'}."
        )
    (folder / "run.json").write_text(
        json.dumps({"command": command, "wall_seconds": time.perf_counter() - begin}, indent=1) + "\n"
    )
    return folder


def nfe_per_update(recipe: dict) -> dict[str, float]:
    """Network evaluations of one generator update of stage 2, from a run's resolved config.

    `student_grad`: student forward+backward passes (with `--rl_transitions all`, one per stochastic transition plus
    the drawn-step pass of the DMD term); `guidance`: real-score (with CFG: 2 each) and fake-score forwards
    of the DMD term; `reference`: forwards of the frozen stage-1 student (KL, DPO); `fake_train`: fake-score
    forward+backward passes (TTUR); `sampling`: student forwards without gradient, at most (rollouts or DMDR's
    backward simulation, one per iteration, each up to `N` steps); `reward_images`: images decoded and scored.
    """
    rows, ratio, steps = recipe["train_batch_size"], recipe["update_ratio"], recipe["num_student_steps"]
    rl = recipe.get("rl", "refl")
    regularizer = recipe.get("rl_regularizer", "dmd")
    epochs = recipe.get("rl_inner_epochs", 1) if rl != "refl" else 1
    group = recipe.get("rl_group_size", 4)
    trained = 2 * rows // group if rl == "dpo" else rows
    dmd = rl == "refl" or regularizer == "dmd"
    cfg = 2 if recipe.get("real_guidance_scale", 1.0) != 1.0 else 1
    no_reward = recipe["cold_start_steps"] >= recipe["max_train_steps"]
    reference = trained if (rl == "dpo" or (rl == "grpo" and regularizer == "kl")) else 0
    # `--rl_transitions all`: one student pass over every stochastic transition (N - 1 per row), plus the drawn-step
    # pass only when the DMD term reads it; the KL arm runs the reference on those states instead.
    every_transition = rows * (steps - 1) if rl == "grpo" and recipe.get("rl_transitions") == "all" else 0
    if every_transition:
        trained = trained if dmd else 0
        reference = every_transition if reference else 0
    return {
        "student_grad": epochs * (trained + every_transition),
        "guidance": epochs * trained * (cfg + 1) if dmd else 0,
        "reference": epochs * reference,
        "fake_train": ratio * rows,
        "sampling": ratio * rows * steps,
        "reward_images": 0 if no_reward else rows,
    }


def _record_file(folder: Path, name: str) -> Path:
    """`name` in a run folder: the exported student's copy (a fresh run) or the archived one (`--archive`)."""
    exported = folder / "student" / name
    return exported if exported.is_file() else folder / name


def reward_curve(folder: Path) -> tuple[list[int], list[float]] | None:
    """The training reward of every logged generator step (`rl/reward_mean`), or None (no RL, or not recorded)."""
    summary = folder / "student" / "train_summary.json"
    if summary.is_file():
        history = json.loads(summary.read_text()).get("history", [])
        rows = [(row["step"], row[REWARD_KEY]) for row in history if REWARD_KEY in row]
        return ([step for step, _ in rows], [value for _, value in rows]) if rows else None
    archived = folder / CURVE_FILE
    if archived.is_file():
        data = json.loads(archived.read_text())
        return data["steps"], data[REWARD_KEY]
    return None


def archive(folder: Path, destination: Path) -> Path:
    """Copy what the table needs of a finished run (metrics, resolved config, reward curve) to `destination/<run>/`:
    the record kept in `docs/rl_runs/`, small enough to commit."""
    target = Path(destination) / folder.name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "metrics.json", target / "metrics.json")
    shutil.copyfile(_record_file(folder, CONFIG_FILE), target / CONFIG_FILE)
    curve = reward_curve(folder)
    if curve is not None:
        (target / CURVE_FILE).write_text(json.dumps({"steps": curve[0], REWARD_KEY: curve[1]}) + "\n")
    if (folder / "run.json").is_file():
        shutil.copyfile(folder / "run.json", target / "run.json")
    for evaluation in folder.glob("evaluation_n*_seed*.json"):
        shutil.copyfile(evaluation, target / evaluation.name)
    return target


def evaluation_name(num_per_pair: int, seed: int) -> str:
    """The file a re-evaluation of a run writes in its folder (`--evaluation_num_per_pair`)."""
    return f"evaluation_n{num_per_pair}_seed{seed}.json"


def reevaluate(folders: list[Path], num_per_pair: int, seed: int) -> None:
    """Evaluate the exported students of finished runs again, on `num_per_pair` samples of every held-out pair from
    noise seeds `seed + i`, with the demo's metrics; the teacher is sampled once on the same noise. Each run gets
    `evaluation_n<N>_seed<S>.json` (the demo's `metrics.json` rows) beside its `metrics.json`; runs that already hold
    it, or whose student was not kept (archived records), are left alone.

    The demo evaluates 160 samples (8 per pair): a pair accuracy near 0.55 then has a sampling standard error of
    about 0.04, as large as the differences between arms; 64 per pair (1280 samples) brings it to about 0.014.
    """
    from . import (
        HELD_OUT_PAIRS,
        TEACHER_GUIDANCE_SCALE,
        TEACHER_NUM_INFERENCE_STEPS,
        build_testbed,
        load_digit_splits,
        load_eval_classifier,
        sample_pairs,
    )
    from .build import evaluate_real_reference, load_real_pairs_from
    from .report import evaluate_row

    name = evaluation_name(num_per_pair, seed)
    pending = [folder for folder in folders if not (folder / name).is_file() and (folder / "student").is_dir()]
    if not pending:
        return
    testbed = build_testbed(None)
    splits = load_digit_splits()
    real_images = load_real_pairs_from(splits)
    common = {"num_per_pair": num_per_pair, "seed": seed}
    teacher_samples = sample_pairs(
        testbed.teacher_dir,
        HELD_OUT_PAIRS,
        num_inference_steps=TEACHER_NUM_INFERENCE_STEPS,
        guidance_scale=TEACHER_GUIDANCE_SCALE,
        desc="teacher",
        **common,
    )
    teacher_name = f"teacher ({TEACHER_NUM_INFERENCE_STEPS} steps, CFG {TEACHER_GUIDANCE_SCALE:g})"
    shared_rows = {
        teacher_name: evaluate_row(
            teacher_samples, testbed, real_images, TEACHER_NUM_INFERENCE_STEPS, TEACHER_GUIDANCE_SCALE
        ),
        REAL_ROW: evaluate_real_reference(load_eval_classifier(testbed.eval_weights), splits, num_per_pair),
    }
    for folder in pending:
        steps = yaml.safe_load(_record_file(folder, CONFIG_FILE).read_text())["num_student_steps"]
        samples = sample_pairs(
            folder / "student",
            HELD_OUT_PAIRS,
            num_inference_steps=steps,
            guidance_scale=None,
            trust_remote_code=True,
            desc=folder.name,
            **common,
        )
        rows = {**shared_rows, f"DMDR student ({steps} steps)": evaluate_row(samples, testbed, real_images, steps)}
        record = {"num_per_pair": num_per_pair, "seed": seed, "rows": rows}
        (folder / name).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_run(folder: Path, evaluation: str | None = None) -> dict:
    """One run's figures: the student's and the teacher's metrics (the demo's, or those of the re-evaluation file
    `evaluation`), wall time, stage-2 training reward, cost."""
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = json.loads((folder / evaluation).read_text())["rows"] if evaluation else metrics["rows"]
    teacher = next(value for name, value in rows.items() if name.startswith(TEACHER_ROW_PREFIX))
    student = next(
        value for name, value in rows.items() if not name.startswith(TEACHER_ROW_PREFIX) and name != REAL_ROW
    )
    recipe = yaml.safe_load(_record_file(folder, CONFIG_FILE).read_text())
    run = {
        "pair_accuracy": student["pair_accuracy"],
        "fd": student["fd"],
        "precision": student.get("precision"),
        "recall": student.get("recall"),
        "teacher_pair_accuracy": teacher["pair_accuracy"],
        "teacher_fd": teacher["fd"],
        "num_samples": student.get("num_samples"),
        "train_seconds": metrics["seconds"].get("training"),
        "total_seconds": metrics["seconds"].get("total"),
        "seed": recipe["seed"],
        "max_train_steps": recipe["max_train_steps"],
        "rl_weight": recipe.get("rl_weight") if recipe.get("rl", "refl") != "refl" else None,
        "rl_kl_weight": recipe.get("rl_kl_weight") if recipe.get("rl_regularizer") == "kl" else None,
        "nfe_per_update": nfe_per_update(recipe),
        "reward_start": None,
        "reward_end": None,
    }
    curve = reward_curve(folder)
    if curve is not None:
        stage_two = [value for step, value in zip(*curve, strict=True) if step > recipe["cold_start_steps"]]
        if stage_two:
            run["reward_start"] = sum(stage_two[:REWARD_WINDOW]) / len(stage_two[:REWARD_WINDOW])
            run["reward_end"] = sum(stage_two[-REWARD_WINDOW:]) / len(stage_two[-REWARD_WINDOW:])
    return run


@dataclass
class ArmSummary:
    """The seeds of one arm, their per-seed figures and the means and spreads over seeds."""

    arm: str
    runs: dict[int, dict] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The arm's label, with the KL weight its runs trained with (the label cannot know `--train_args`)."""
        weights = sorted({run["rl_kl_weight"] for run in self.runs.values() if run.get("rl_kl_weight") is not None})
        if not weights:
            return ARMS[self.arm].label
        return f"{ARMS[self.arm].label}, weight {' / '.join(f'{weight:g}' for weight in weights)}"

    def stat(self, key: str) -> tuple[float, float]:
        return mean_std([run[key] for run in self.runs.values() if run.get(key) is not None])


def finished_runs(output_dir: Path, arms: list[str] | None = None) -> list[Path]:
    """The folders `<arm>_seed<s>` under `output_dir` that hold `metrics.json`, for the known arms (or `arms`)."""
    folders = []
    for folder in sorted(Path(output_dir).glob("*_seed*")):
        arm, _, seed = folder.name.rpartition("_seed")
        if arm in ARMS and seed.isdigit() and (folder / "metrics.json").is_file() and (arms is None or arm in arms):
            folders.append(folder)
    return folders


def collect(output_dir: Path, arms: list[str] | None = None, evaluation: str | None = None) -> dict[str, ArmSummary]:
    """Every finished run under `output_dir`; with `evaluation` (a re-evaluation file name) only the runs that hold
    it, read from it (the others are named on stderr)."""
    found: dict[str, ArmSummary] = {}
    for folder in finished_runs(output_dir, arms):
        if evaluation and not (folder / evaluation).is_file():
            print(f"{folder.name}: no {evaluation}, left out of the table", file=sys.stderr)  # noqa: T201
            continue
        arm, _, seed = folder.name.rpartition("_seed")
        found.setdefault(arm, ArmSummary(arm)).runs[int(seed)] = read_run(folder, evaluation)
    return found


def _pm(stat: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, std = stat
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _distinct(summaries: dict[str, "ArmSummary"], key: str) -> list:
    """The distinct values of `key` over every run of the table, sorted, unknown ones left out."""
    return sorted({run.get(key) for summary in summaries.values() for run in summary.runs.values()} - {None})


def fd_ratio(fd: float, dmd_only_fd: float) -> str:
    """FD over the DMD-only student's, or "-" when the table has no DMD-only run."""
    return "-" if math.isnan(dmd_only_fd) else f"{fd / dmd_only_fd:.2f}"


def ranked_table(summaries: dict[str, ArmSummary]) -> str:
    """The markdown table (Table 5b's analogue): arms ranked by mean held-out pair accuracy."""
    teacher = mean_std([run["teacher_pair_accuracy"] for s in summaries.values() for run in s.runs.values()])
    dmd_fd = summaries["dmd_only"].stat("fd")[0] if "dmd_only" in summaries else float("nan")
    header = (
        "| rank | arm | seeds | held-out pair accuracy (mean ± std) | vs teacher, points | per seed | FD | "
        "FD / DMD only | precision | recall | training reward, first -> last 50 stage-2 steps | "
        "training minutes (fastest seed) | NFE per generator update |\n" + "|---" * 13 + "|\n"
    )
    lines = []
    order = sorted(summaries.values(), key=lambda s: -s.stat("pair_accuracy")[0])
    for rank, summary in enumerate(order, 1):
        runs = summary.runs
        seeds = ", ".join(str(seed) for seed in sorted(runs))
        per_seed = " / ".join(f"{runs[seed]['pair_accuracy']:.3f}" for seed in sorted(runs))
        accuracy = summary.stat("pair_accuracy")
        reward = "-"
        if any(run["reward_start"] is not None for run in runs.values()):
            reward = f"{summary.stat('reward_start')[0]:.3f} -> {summary.stat('reward_end')[0]:.3f}"
        cost = next(iter(runs.values()))["nfe_per_update"]
        # The machine is shared: the fastest seed is the best estimate of what a run costs with a core to itself.
        fastest = min(run["train_seconds"] for run in runs.values())
        nfe = (
            f"{cost['student_grad']} student fwd+bwd, {cost['guidance']} guidance, {cost['reference']} reference, "
            f"{cost['fake_train']} fake fwd+bwd, <= {cost['sampling']} sampling"
        )
        lines.append(
            f"| {rank} | {summary.label} | {seeds} | {_pm(accuracy)} | "
            f"{100 * (accuracy[0] - summary.stat('teacher_pair_accuracy')[0]):+.1f} | {per_seed} | {_pm(summary.stat('fd'), 2)} | "
            f"{fd_ratio(summary.stat('fd')[0], dmd_fd)} | {_pm(summary.stat('precision'), 2)} | "
            f"{_pm(summary.stat('recall'), 2)} | {reward} | {fastest / 60:.1f} | {nfe} |"
        )
    lengths, counts, weights = (_distinct(summaries, key) for key in ("max_train_steps", "num_samples", "rl_weight"))
    note = (
        f"\nRuns of {' / '.join(map(str, lengths))} generator steps (the first "
        f"{DIGITS_RECIPE['cold_start_steps']} the DMD cold start); GRPO / DPO weight lambda "
        f"{' / '.join(f'{weight:g}' for weight in weights) or '-'}. "
        f"Teacher (50 steps, CFG 3, same evaluation noise): held-out pair accuracy {teacher[0]:.3f}. "
        f"Evaluation: {' / '.join(map(str, counts)) or '?'} samples of the 20 held-out pairs per sampler. "
        "Spreads are the sample standard deviation over seeds (0 for one seed). Training minutes are wall time on a "
        "shared machine (one torch thread per run).\n"
    )
    return header + "\n".join(lines) + "\n" + note


def issue_checks(summaries: dict[str, ArmSummary], arm: str = "grpo_dmd") -> list[str]:
    """Issue 22's headline for `arm`, on the mean over its seeds and per seed: >= +10 points over the teacher and FD
    <= 1.2x the DMD-only student's (same seeds)."""
    if arm not in summaries or "dmd_only" not in summaries:
        return [f"{arm} or dmd_only has no finished run: nothing to check."]
    runs, reference = summaries[arm].runs, summaries["dmd_only"].runs
    teacher = mean_std([run["teacher_pair_accuracy"] for run in runs.values()])[0]
    gain = summaries[arm].stat("pair_accuracy")[0] - teacher
    ratio = summaries[arm].stat("fd")[0] / summaries["dmd_only"].stat("fd")[0]
    verdict = "met" if gain >= ACCURACY_GAIN_TARGET and ratio <= FD_RATIO_LIMIT else "NOT met"
    lines = [
        f"{summaries[arm].label}, seeds {sorted(runs)}: {100 * gain:+.1f} points over the teacher (target "
        f"+{100 * ACCURACY_GAIN_TARGET:.0f}), FD {ratio:.2f}x the DMD-only student's (limit {FD_RATIO_LIMIT}): {verdict}."
    ]
    for seed in sorted(runs):
        run = runs[seed]
        fd_ratio = run["fd"] / reference[seed]["fd"] if seed in reference else float("nan")
        lines.append(
            f"  seed {seed}: {100 * (run['pair_accuracy'] - run['teacher_pair_accuracy']):+.1f} points, "
            f"FD {fd_ratio:.2f}x DMD only's (same seed)"
        )
    return lines


def _dmd_rl(arm: str) -> bool:
    """Whether `arm` is GRPO or DPO regularised by DMD."""
    flags = ARMS[arm].demo_args
    return "--rl" in flags and "--rl_regularizer" in flags and flags[flags.index("--rl_regularizer") + 1] == "dmd"


def regulariser_checks(summaries: dict[str, ArmSummary]) -> list[str]:
    """The paper's central claim for GRPO, on the means over seeds: DMD + GRPO gains at least as much held-out accuracy
    as GRPO with the KL regulariser or with none, at an FD and a recall at least as good."""
    if "grpo_dmd" not in summaries:
        return []
    dmd = summaries["grpo_dmd"]
    lines = []
    for other in ("grpo_kl", "grpo_none"):
        if other not in summaries:
            continue
        rival = summaries[other]
        holds = {
            "accuracy": dmd.stat("pair_accuracy")[0] >= rival.stat("pair_accuracy")[0],
            "FD": dmd.stat("fd")[0] <= rival.stat("fd")[0],
            "recall": dmd.stat("recall")[0] >= rival.stat("recall")[0],
        }
        verdict = ", ".join(f"{name} {'holds' if ok else 'FAILS'}" for name, ok in holds.items())
        lines.append(f"DMD + GRPO against {rival.label}: {verdict}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dmdr.digits.rl_comparison", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output_dir", default="outputs/rl_comparison")
    parser.add_argument(
        "--docs",
        default=None,
        help="write the markdown table here (and the figures per run to the same name with .json)",
    )
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=sorted(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="generator steps of every arm (default: the recipe's 500); the DMD-only arm's cold start spans them all",
    )
    parser.add_argument(
        "--train_args",
        default="",
        help='trainer flags every arm gets after its own, as one string (e.g. "--rl_weight 10 --rl_kl_weight 0.4")',
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one torch thread each)")
    parser.add_argument("--force", action="store_true", help="rerun arms whose folder already holds metrics.json")
    parser.add_argument("--collect_only", action="store_true", help="only read the finished runs and write the table")
    parser.add_argument(
        "--skip_training",
        action="store_true",
        help="train nothing: only evaluate the finished runs (with --evaluation_num_per_pair) and write the table",
    )
    parser.add_argument(
        "--evaluation_num_per_pair",
        type=int,
        default=None,
        help="evaluate every finished run's student again on this many samples per held-out pair (the demo uses 8; "
        "64 gives 1280 samples) and build the table from those evaluations",
    )
    parser.add_argument(
        "--evaluation_seed", type=int, default=50_000, help="first noise seed of that evaluation (the demo uses 1000)"
    )
    parser.add_argument(
        "--archive", default=None, help="copy each finished run's metrics, config and reward curve here (docs/rl_runs)"
    )
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.max_train_steps is not None and args.max_train_steps <= DIGITS_RECIPE["cold_start_steps"]:
        parser.error(
            f"--max_train_steps must exceed the recipe's cold start ({DIGITS_RECIPE['cold_start_steps']} steps), "
            f"got {args.max_train_steps}"
        )
    train_args = tuple(shlex.split(args.train_args))
    if not (args.collect_only or args.skip_training):
        plan = [(arm, seed) for seed in args.seeds for arm in args.arms]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [
                pool.submit(run_arm, arm, seed, output_dir, args.force, args.max_train_steps, train_args)
                for arm, seed in plan
            ]
            for future in runs:
                future.result()
    evaluation = None
    if args.evaluation_num_per_pair is not None:
        if args.evaluation_num_per_pair < 1:
            parser.error(f"--evaluation_num_per_pair must be at least 1, got {args.evaluation_num_per_pair}")
        evaluation = evaluation_name(args.evaluation_num_per_pair, args.evaluation_seed)
        if not args.collect_only:
            reevaluate(finished_runs(output_dir, args.arms), args.evaluation_num_per_pair, args.evaluation_seed)
    summaries = collect(output_dir, args.arms, evaluation)
    if args.archive:
        for summary in summaries.values():
            for seed in summary.runs:
                archive(run_folder(output_dir, summary.arm, seed), Path(args.archive))
    if not summaries:
        missing = f" holds {evaluation} (drop --collect_only to evaluate them)" if evaluation else ""
        raise SystemExit(
            f"python -m diffusers_dmdr.digits.rl_comparison: error: no finished run in {output_dir}{missing}."
        )
    # The issue's headline for the two recipe arms, and for every other DMD-regularised GRPO / DPO arm in the table.
    checked = ["grpo_dmd", "dpo_dmd"] + [
        arm for arm in summaries if arm not in ("grpo_dmd", "dpo_dmd") and _dmd_rl(arm)
    ]
    checks = [line for arm in checked for line in issue_checks(summaries, arm)] + regulariser_checks(summaries)
    text = ranked_table(summaries) + "\n" + "\n".join(checks) + "\n"
    if args.docs:
        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(
            "# Issue 22 on the digit pairs: ReFL, GRPO and DPO ranked (generated by "
            "`python -m diffusers_dmdr.digits.rl_comparison`)\n\n" + text,
            encoding="utf-8",
        )
        raw = {arm: {str(seed): run for seed, run in s.runs.items()} for arm, s in summaries.items()}
        docs.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
