"""The paper's claims as checks on reproduction summaries: pure functions with rules fixed before any run.

A summary is `{arm: {metric: (mean, sample std over seeds)}}` (`reproduce.summarise`). Every comparison uses one rule
(`compare`): `a` is *clearly* better than `b` when the means differ by more than the larger of the two seed standard
deviations, in the claimed direction ("yes"); clearly worse is "no"; anything closer is a "tie"; a missing arm or
metric is "missing". Each claim is then

- **held** when every comparison it needs is "yes" (and its stated thresholds are met);
- **did not hold** when one of them is "no" (or a threshold is clearly missed);
- **tie** otherwise (the differences are within the seeds' spread);
- **not run** when an arm it needs is missing.

The thresholds of claim 1 are the issue's targets: the DMDR student's held-out pair accuracy at least
`ACCURACY_GAIN_TARGET` above the 50-step CFG teacher's, with FD at most `FD_RATIO_LIMIT` times the DMD-only student's.
"""

import math


ACCURACY_GAIN_TARGET = 0.10
FD_RATIO_LIMIT = 1.2
VERDICTS = ("held", "did not hold", "tie", "not run")


def mean_of(summary: dict, arm: str, key: str) -> float:
    return summary.get(arm, {}).get(key, (float("nan"), float("nan")))[0]


def std_of(summary: dict, arm: str, key: str) -> float:
    return summary.get(arm, {}).get(key, (float("nan"), float("nan")))[1]


def compare(summary: dict, a_arm: str, b_arm: str, key: str, better: str = "higher") -> str:
    """`"yes"` if `a_arm` is clearly better than `b_arm` on `key`, `"no"` if clearly worse, else `"tie"` (or
    `"missing"`). Clearly: the means differ by more than the larger of the two seed standard deviations."""
    a, b = mean_of(summary, a_arm, key), mean_of(summary, b_arm, key)
    if any(math.isnan(x) for x in (a, b)):
        return "missing"
    margin = max(std_of(summary, a_arm, key), std_of(summary, b_arm, key))
    if abs(a - b) <= margin:
        return "tie"
    return "yes" if (a > b) == (better == "higher") else "no"


def verdict_of(results: list[str]) -> str:
    """Combine comparisons: any missing -> not run; all yes -> held; any no -> did not hold; else tie."""
    if "missing" in results:
        return "not run"
    if all(result == "yes" for result in results):
        return "held"
    if "no" in results:
        return "did not hold"
    return "tie"


def any_of(results: list[str]) -> str:
    """One of several alternatives suffices: missing if any is missing, yes if any is yes, no if all are no, else tie."""
    if "missing" in results:
        return "missing"
    if "yes" in results:
        return "yes"
    return "no" if all(result == "no" for result in results) else "tie"


def claim_student_beats_teacher(summary: dict) -> dict:
    """(1) The 4-step DMDR student beats the 50-step CFG teacher on the held-out judge, without losing FD."""
    gain = mean_of(summary, "dmdr_4step", "pair_accuracy") - mean_of(summary, "teacher", "pair_accuracy")
    beats = compare(summary, "dmdr_4step", "teacher", "pair_accuracy")
    fd_ratio = mean_of(summary, "dmdr_4step", "fd") / mean_of(summary, "dmd_4step", "fd")
    if beats == "missing" or math.isnan(fd_ratio):
        verdict = "not run"
    elif beats == "yes" and gain >= ACCURACY_GAIN_TARGET and fd_ratio <= FD_RATIO_LIMIT:
        verdict = "held"
    elif beats == "no" or fd_ratio > FD_RATIO_LIMIT:
        verdict = "did not hold"
    else:
        verdict = "tie"
    return {
        "claim": f"1. The 4-step DMDR student beats the 50-step CFG teacher on held-out pair accuracy by at least "
        f"{100 * ACCURACY_GAIN_TARGET:.0f} points, with FD at most {FD_RATIO_LIMIT}x the DMD-only student's.",
        "verdict": verdict,
        "evidence": f"pair accuracy DMDR - teacher: {100 * gain:+.1f} points (clearly higher: {beats}); FD DMDR / "
        f"DMD-only: {fd_ratio:.2f}; DMD-only vs teacher pair accuracy clearly higher: "
        f"{compare(summary, 'dmd_4step', 'teacher', 'pair_accuracy')}.",
    }


def claim_dmd_regularises_rl(summary: dict) -> dict:
    """(2) With a hackable reward, RL alone raises the reward while the judge or FD gets worse; DMD prevents it better
    than the L2 anchor."""
    reward_up = compare(summary, "rl_only", "stage1", "reward")
    fd_worse = compare(summary, "rl_only", "stage1", "fd", better="higher")
    judge_worse = compare(summary, "rl_only", "stage1", "pair_accuracy", better="lower")
    hacked = any_of([fd_worse, judge_worse])
    dmd_vs_anchor = compare(summary, "dmdr_4step", "rl_anchor", "fd", better="lower")
    return {
        "claim": "2. With the hackable reward, RL alone (from the stage-1 student) raises the training reward while "
        "FD or the held-out judge gets worse, and DMD prevents it better than an L2 anchor (lower FD).",
        "verdict": verdict_of([reward_up, hacked, dmd_vs_anchor]),
        "evidence": f"RL-only vs stage 1: reward higher: {reward_up}; FD higher: {fd_worse}; pair accuracy lower: "
        f"{judge_worse}. DMDR FD lower than RL+anchor: {dmd_vs_anchor}; DMDR FD lower than RL-only: "
        f"{compare(summary, 'dmdr_4step', 'rl_only', 'fd', better='lower')}.",
    }


def claim_dyna_cold_start(early: dict[str, dict[int, tuple[float, float]]], dynamic_steps: int) -> dict:
    """(3) DynaDG + DynaRS lower the early FD of stage 1: held when clearly lower at more than half of the
    checkpoints within the annealing, did not hold when clearly higher at more than half, else a tie."""
    dyna, base = early.get("+DynaDG+DynaRS", {}), early.get("baseline", {})
    steps = [step for step in dyna if 0 < step <= dynamic_steps and step in base]
    spread = {step: max(dyna[step][1], base[step][1]) for step in steps}
    wins = sum(dyna[step][0] + spread[step] < base[step][0] for step in steps)
    losses = sum(base[step][0] + spread[step] < dyna[step][0] for step in steps)
    if not steps:
        verdict = "not run"
    elif wins > len(steps) / 2:
        verdict = "held"
    elif losses > len(steps) / 2:
        verdict = "did not hold"
    else:
        verdict = "tie"
    return {
        "claim": "3. DynaDG + DynaRS lower the early FD of stage 1 compared with the plain cold start.",
        "verdict": verdict,
        "evidence": f"Checkpoints within the annealing (steps {steps}): clearly lower FD at {wins}, clearly higher at "
        f"{losses}.",
    }


def claim_rtdm(summary: dict) -> dict:
    """(4) RT-DM (reward-tilted DMD in stage 1) speeds early reward gains: a higher reward at the end of stage 1."""
    reward_up = compare(summary, "stage1_rtdm", "stage1", "reward")
    return {
        "claim": "4. RT-DM speeds up early reward gains: at the end of stage 1 the RT-DM student has a higher reward "
        "than the plain DMD stage-1 student.",
        "verdict": verdict_of([reward_up]),
        "evidence": f"stage-1 reward RT-DM vs DMD clearly higher: {reward_up}; pair accuracy clearly higher: "
        f"{compare(summary, 'stage1_rtdm', 'stage1', 'pair_accuracy')}.",
    }


def claim_reward_weight_tradeoff(summary: dict) -> dict:
    """(5) A larger reward weight buys reward with distribution quality: reward up and FD up or recall down."""
    reward_up = compare(summary, "dmdr_w_high", "dmdr_w_low", "reward")
    fd_up = compare(summary, "dmdr_w_high", "dmdr_w_low", "fd", better="higher")
    recall_down = compare(summary, "dmdr_w_high", "dmdr_w_low", "recall", better="lower")
    cost = any_of([fd_up, recall_down])
    return {
        "claim": "5. The reward weight trades reward for distribution quality: the high weight reaches a higher "
        "reward than the low one, at a higher FD or a lower recall.",
        "verdict": verdict_of([reward_up, cost]),
        "evidence": f"high vs low weight: reward higher: {reward_up}; FD higher: {fd_up}; recall lower: "
        f"{recall_down}; middle weight (DMDR) reward {mean_of(summary, 'dmdr_4step', 'reward'):.3f}.",
    }


def claim_cfg_tradeoff(summary: dict) -> dict:
    """(6) Larger real-score CFG trades recall for precision (off vs high, with moderate reported)."""
    precision_up = compare(summary, "dmdr_cfg_high", "dmdr_cfg_off", "precision")
    recall_down = compare(summary, "dmdr_cfg_high", "dmdr_cfg_off", "recall", better="lower")
    return {
        "claim": "6. A larger real-score CFG trades recall for precision: CFG high vs off has a higher precision and a "
        "lower recall.",
        "verdict": verdict_of([precision_up, recall_down]),
        "evidence": f"CFG high vs off: precision higher: {precision_up}; recall lower: {recall_down}; precision "
        f"off/moderate/high: {mean_of(summary, 'dmdr_cfg_off', 'precision'):.3f} / "
        f"{mean_of(summary, 'dmdr_4step', 'precision'):.3f} / {mean_of(summary, 'dmdr_cfg_high', 'precision'):.3f}.",
    }


def check_claims(summary: dict, early: dict, dynamic_steps: int) -> list[dict]:
    """Claims (1)-(6) of issue 12, in order; each `{"claim", "verdict", "evidence"}` with a verdict of `VERDICTS`."""
    return [
        claim_student_beats_teacher(summary),
        claim_dmd_regularises_rl(summary),
        claim_dyna_cold_start(early, dynamic_steps),
        claim_rtdm(summary),
        claim_reward_weight_tradeoff(summary),
        claim_cfg_tradeoff(summary),
    ]
