"""Summaries, tables, plots and the markdown report of `make reproduce` (`diffusers_dmdr.digits.reproduce`)."""

import math
import platform
from pathlib import Path

import numpy as np
import torch

from .claims import ACCURACY_GAIN_TARGET, FD_RATIO_LIMIT, mean_of
from .recipe import DIGITS_RECIPE
from .report import TABLE_COLUMNS


# Metrics reported per arm, with their table headers: the demo's columns, NFE last (it is per arm, not per run).
METRIC_COLUMNS = {
    key: header
    for key, header in TABLE_COLUMNS.items()
    if key not in ("num_inference_steps", "guidance_scale", "nfe_per_sample")
}
METRIC_COLUMNS["nfe_per_sample"] = TABLE_COLUMNS["nfe_per_sample"]
# Arms in table order, with what each is.
ARM_DESCRIPTIONS = {
    "teacher": "teacher, 50 Euler steps, CFG 3 (the testbed's setting)",
    "stage1": "stage-1 student (DMD with DynaDG+DynaRS), the shared start of every stage-2 arm",
    "stage1_no_dyna": "stage-1 student without DynaDG/DynaRS",
    "stage1_rtdm": "stage-1 student with RT-DM (reward-tilted DMD directions)",
    "dmd_4step": "DMD only, 4 steps (stage 1 continued without reward)",
    "dmdr_4step": "DMDR, 4 steps: stage 1 then DMD + reward, real CFG moderate",
    "dmdr_w_low": "DMDR with the low reward weight",
    "dmdr_w_high": "DMDR with the high reward weight",
    "dmdr_cfg_off": "DMDR, real-score CFG off (1.0, no jitter) in stage 2",
    "dmdr_cfg_high": "DMDR, real-score CFG high in stage 2",
    "rl_only": "RL only from the stage-1 student (no DMD)",
    "rl_anchor": "RL + L2 anchor to the stage-1 student (no DMD)",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), ignoring NaN."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def summarise(results: dict[str, dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{arm: {metric: (mean, std over seeds)}}`."""
    summary = {}
    for arm, by_seed in results.items():
        keys = {
            key
            for result in by_seed.values()
            for key in result.metrics
            if isinstance(result.metrics[key], float | int)
        }
        summary[arm] = {key: mean_std([r.metrics.get(key) for r in by_seed.values()]) for key in sorted(keys)}
    return summary


def early_fd_curves(results: dict[str, dict], arm: str) -> dict[int, tuple[float, float]]:
    """`{generator step: (mean, std of FD over seeds)}` of an arm scored at its checkpoints."""
    by_step: dict[int, list[float]] = {}
    for result in results.get(arm, {}).values():
        for step, fd in result.early_fd:
            by_step.setdefault(step, []).append(fd)
    return {step: mean_std(values) for step, values in sorted(by_step.items())}


def reward_curves(results: dict[str, dict], prefix: str = "reward/") -> dict[str, dict]:
    """`{arm: {"steps": [...], "mean": [...], "std": [...]}}` of the logged training reward (stage 2 only)."""
    curves = {}
    for arm, by_seed in results.items():
        per_step: dict[int, list[float]] = {}
        for result in by_seed.values():
            for entry in result.history:
                for key, value in entry.items():
                    if key.startswith(prefix):
                        per_step.setdefault(entry["step"], []).append(value)
        if per_step:
            steps = sorted(per_step)
            stats = [mean_std(per_step[step]) for step in steps]
            curves[arm] = {"steps": steps, "mean": [m for m, _ in stats], "std": [s for _, s in stats]}
    return curves


def format_cell(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}g} ± {std:.2g}"


def metrics_table(summary: dict, arms: list[str], real_reference: dict | None = None) -> str:
    """Markdown table of mean ± std over seeds, one line per arm."""
    lines = ["| arm | " + " | ".join(METRIC_COLUMNS.values()) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for arm in arms:
        if arm not in summary:
            continue
        cells = [format_cell(*summary[arm].get(key, (float("nan"), float("nan")))) for key in METRIC_COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if real_reference:
        cells = [f"{real_reference[key]:.3g}" if key in real_reference else "" for key in METRIC_COLUMNS]
        lines.append("| real digits (reference) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finish_plot(figure, axis, path: Path) -> Path:
    """Grid, legend, layout, save and close: the common end of every reproduction plot."""
    import matplotlib.pyplot as plt

    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_reward_curves(curves: dict[str, dict], path: Path) -> Path | None:
    """Training reward (batch mean log p, mean ± std over seeds) against the generator step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for arm, curve in curves.items():
        steps, mean, std = np.asarray(curve["steps"]), np.asarray(curve["mean"]), np.asarray(curve["std"])
        axis.plot(steps, mean, label=arm, linewidth=1.2)
        axis.fill_between(steps, mean - std, mean + std, alpha=0.15)
    axis.set_xlabel("generator step (stage 2 starts after the cold start)")
    axis.set_ylabel("training reward: log p(prompted digit)")
    return _finish_plot(figure, axis, path)


def plot_early_fd(curves: dict[str, dict[int, tuple[float, float]]], path: Path, dynamic_steps: int) -> Path:
    """FD at stage-1 checkpoints (mean ± std over seeds), one line per cold-start strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        steps = np.asarray(list(curve))
        mean = np.asarray([m for m, _ in curve.values()])
        std = np.asarray([s for _, s in curve.values()])
        axis.errorbar(steps, mean, yerr=std, label=label, marker="o", capsize=3, linewidth=1.2)
    axis.axvline(dynamic_steps, color="grey", linestyle="--", linewidth=1, label="DynaDG/DynaRS annealing ends")
    axis.set_xlabel("stage-1 generator step")
    axis.set_ylabel("FD (eval-classifier features)")
    axis.set_yscale("log")
    return _finish_plot(figure, axis, path)


def write_report(
    path: Path,
    figures_dir: Path,
    settings,
    summary: dict,
    early: dict,
    claims: list[dict],
    real_reference: dict,
    seconds: dict,
    machine: str,
) -> None:
    """`docs/reproduction.md`: what ran, on what, how long, the tables, the plots and the verdicts."""
    figures = figures_dir.name
    total = seconds.get("total", float("nan"))
    arms = [arm for arm in ARM_DESCRIPTIONS if arm in summary]
    lines = [
        "# Small-scale reproduction of the DMDR paper's claims (digit-pairs testbed)",
        "",
        "Generated by `make reproduce` (`python -m diffusers_dmdr.digits.reproduce --output_dir outputs/reproduce "
        "--docs docs/reproduction.md`); the raw numbers are in "
        f"[`{figures}/results.json`]({figures}/results.json). The testbed is described in `docs/digits.md`.",
        "",
        "## What ran",
        "",
        f"- Machine: {machine}. Wall time of the whole run: **{total / 60:.1f} min** "
        f"(training {seconds.get('training', float('nan')) / 60:.1f} min).",
        f"- Seeds {settings.seeds}; every arm runs once per seed, on the same teacher and budgets. Stage 1 (cold start, "
        f"DMD only) is {settings.stage1_steps} generator updates, stage 2 is {settings.stage2_steps} more; "
        f"batch {settings.train_batch_size}, TTUR {settings.update_ratio}, DynaDG/DynaRS annealed over "
        f"{settings.dynamic_steps} steps, reward weight {settings.reward_weight} (linear log p of the pair reward), "
        f"real-score CFG {settings.cfg_moderate} ± 0.5 unless stated; everything else is the demo recipe "
        "(`diffusers_dmdr.digits.recipe`: full 4-step student `[999, 749, 499, 249]` at 32 x 64, lr 1e-4).",
        f"- Evaluation: {settings.num_per_pair} samples per held-out pair ({20 * settings.num_per_pair} per arm and "
        "seed), with identical noise for every arm of a seed (sample `i` of seed `s` starts from "
        f"`manual_seed({settings.eval_seed} + 10000 s + i)`), against real pairs of the held-out real digits. Pair "
        "accuracy, FD, precision/recall (k=3) and diversity use the evaluation classifier, which no run trains on; "
        "reward is the training reward (the small reward classifier's log p of the prompted pair). The teacher's "
        "spread over seeds is sampling noise only.",
        "- The hackable reward (claim 2): the reward classifier is deliberately small and non-robust (a 25k-parameter "
        "CNN trained on a few hundred single digits with light augmentation), and the reward is its log-probability, "
        "which an optimiser can raise with strokes the separate evaluation classifier does not accept. We chose it "
        "over an unbounded logit reward because it is the same reward the DMDR arms use, so the RL-only and anchor "
        "arms differ from DMDR only in the regulariser.",
        "- Arms:",
        "",
    ]
    lines += [f"  - `{arm}`: {ARM_DESCRIPTIONS[arm]}" for arm in arms]
    lines += [
        "",
        "  Every stage-2 arm resumes from the same stage-1 checkpoint of its seed (`checkpoint-<stage1>`, optimiser "
        "states included). RL-only and RL+anchor run with `update_ratio=1` because their fake score idles (extra TTUR "
        f"iterations would only be discarded rollouts); the anchor weight is {settings.anchor_weight} on the L2 "
        "between the student's x0 and the stage-1 student's x0 on the same input.",
        f"- Real-score CFG in stage 2: off = 1.0 with no jitter, moderate = {settings.cfg_moderate} ± 0.5 "
        f"(`dmdr_4step`), high = {settings.cfg_high} ± 0.5. Reward weights: low {settings.reward_weight_low}, "
        f"DMDR {settings.reward_weight}, high {settings.reward_weight_high} (hacked in the demo's sweep); RT-DM "
        f"weights each sample's DMD direction by `B softmax(s z)` of its batch z-scored reward, tilt strength "
        f"s = {settings.rtdm_tilt_strength}.",
        "- Threads: one torch thread per process (`--num_threads 1`, `OMP_NUM_THREADS=1`): on the shared 2-core "
        "machine two threads ran 10-20x slower.",
        "- What was cut to fit 60 minutes on this CPU: the paper trains thousands of generator updates; here stage 1 "
        f"is {settings.stage1_steps} and stage 2 {settings.stage2_steps} updates, and the cold-start comparison has "
        "two arms (baseline, +DynaDG+DynaRS) instead of three. Claims about what happens late in training (plateaus, "
        "annealing advantage narrowing) are out of reach at this length. Claim 1 is among them: on this testbed the "
        "reward's gain in pair accuracy grows with the length of stage 2 (about 2.5 points per 100 updates at the "
        "demo's weight) while DMD alone does not gain, so `make demo`'s "
        f"{DIGITS_RECIPE['max_train_steps'] - DIGITS_RECIPE['cold_start_steps']}-update stage 2 is where it is "
        "measured (docs/digits.md, three seeds).",
        "",
        "## Results (mean ± sample std over seeds)",
        "",
        metrics_table(summary, arms, real_reference),
        "NFE counts a CFG step twice. samples/s is the sampler alone on this CPU (noisy: other jobs shared it). "
        "The real-pairs row compares real pairs made from the teacher split with the held-out real pairs at the "
        "same sample count: the floor of FD and the ceiling of recall.",
        "",
        "Training seconds per generator update (mean over seeds):",
        "",
        "| arm | s / generator update | train seconds |",
        "|---|---|---|",
    ]
    for arm in arms:
        if "seconds_per_generator_step" in summary[arm]:
            lines.append(
                f"| {arm} | {mean_of(summary, arm, 'seconds_per_generator_step'):.2f} | "
                f"{mean_of(summary, arm, 'train_seconds'):.0f} |"
            )
    lines += [
        "",
        "## Training reward",
        "",
        f"![training reward]({figures}/training_rewards.png)",
        "",
        "Batch-mean log p of the prompted pair under the reward classifier on the student's one-step prediction, "
        "logged by the trainer in stage 2 (stage 1 logs no reward). Mean ± std over seeds.",
        "",
        "## Cold start: FD at early stage-1 checkpoints",
        "",
        f"![early FD]({figures}/early_fd.png)",
        "",
        f"FD of the 4-step student ({settings.early_num_per_pair} samples per held-out pair, the seed's noise) at every "
        f"{settings.early_every}th stage-1 generator update; step 0 is the teacher's weights used as a 4-step student.",
        "",
        "| step | baseline | +DynaDG+DynaRS |",
        "|---|---|---|",
    ]
    baseline, dyna = early.get("baseline", {}), early.get("+DynaDG+DynaRS", {})
    for step in sorted(set(baseline) | set(dyna)):
        lines.append(
            f"| {step} | {format_cell(*baseline.get(step, (float('nan'),) * 2))} | "
            f"{format_cell(*dyna.get(step, (float('nan'),) * 2))} |"
        )
    lines += [
        "",
        "## Which of the paper's claims held here",
        "",
        "Rules fixed before the run (`diffusers_dmdr.digits.claims`): a difference counts only when the means "
        "differ by more than the larger seed std of the two arms; otherwise it is a tie. A claim holds when every "
        "comparison it needs goes its way (and claim 1's thresholds are met: at least "
        f"{100 * ACCURACY_GAIN_TARGET:.0f} points of pair accuracy over the teacher, FD at most {FD_RATIO_LIMIT}x "
        "DMD-only's), does not hold when one goes clearly the other way, and is a tie otherwise.",
        "",
    ]
    for claim in claims:
        lines += [f"- **{claim['claim']}** — **{claim['verdict']}**. {claim['evidence']}"]
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def machine_description(num_threads: int) -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "CPU only" if not torch.cuda.is_available() else f"GPU {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({cpu}), {device}, torch {torch.__version__}, {num_threads} torch thread(s)"
