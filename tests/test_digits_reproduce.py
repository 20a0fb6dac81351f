"""The reproduction (`make reproduce`): the claim rules on constructed results with known verdicts, and the machinery on
a reduced testbed and tiny budgets (shared stage 1, resumed arms, the early-FD callback, summaries, the report)."""

import math

import pytest
import torch
from conftest import TINY_DIGITS_SETTINGS as TINY_SETTINGS

from diffusers_dmdr.digits import build_testbed
from diffusers_dmdr.digits.claims import (
    check_claims,
    claim_cfg_tradeoff,
    claim_dmd_regularises_rl,
    claim_dyna_cold_start,
    claim_reward_weight_tradeoff,
    claim_rtdm,
    claim_student_beats_teacher,
    compare,
)
from diffusers_dmdr.digits.reproduce import Reproduction, ReproductionSettings
from diffusers_dmdr.digits.reproduce_report import (
    early_fd_curves,
    mean_std,
    metrics_table,
    reward_curves,
    summarise,
    write_report,
)


# ---------------------------------------------------------------------------------------------- the rules


def arm(spread=0.01, **metrics):
    return {key: (value, spread) for key, value in metrics.items()}


def test_compare_uses_the_larger_seed_spread():
    summary = {"a": arm(0.05, fd=1.0), "b": arm(0.01, fd=1.1), "c": arm(0.01, fd=1.3)}
    assert compare(summary, "a", "b", "fd", better="lower") == "yes"  # 0.1 apart > 0.05
    assert compare(summary, "b", "a", "fd", better="lower") == "no"
    summary["a"] = arm(0.2, fd=1.0)
    assert compare(summary, "a", "b", "fd", better="lower") == "tie"
    assert compare(summary, "a", "missing", "fd") == "missing"
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([float("nan"), 2.0]) == (2.0, 0.0)


def test_claim_1_needs_ten_points_and_fd_within_the_limit():
    base = {"teacher": arm(pair_accuracy=0.60), "dmd_4step": arm(pair_accuracy=0.55, fd=1.0)}
    held = {**base, "dmdr_4step": arm(pair_accuracy=0.75, fd=1.15)}
    assert claim_student_beats_teacher(held)["verdict"] == "held"
    # Clearly better but only 5 points: not the claimed gap, and not worse either.
    assert claim_student_beats_teacher({**base, "dmdr_4step": arm(pair_accuracy=0.65, fd=1.0)})["verdict"] == "tie"
    # Beats the teacher by 15 points but at 1.5x the DMD-only FD.
    assert (
        claim_student_beats_teacher({**base, "dmdr_4step": arm(pair_accuracy=0.75, fd=1.5)})["verdict"]
        == "did not hold"
    )
    assert claim_student_beats_teacher({**base, "dmdr_4step": arm(pair_accuracy=0.4, fd=1.0)})["verdict"] == (
        "did not hold"
    )
    assert claim_student_beats_teacher(base)["verdict"] == "not run"


def test_claim_2_hacking_and_the_regulariser():
    summary = {
        "stage1": arm(reward=-2.0, fd=1.0, pair_accuracy=0.5),
        "rl_only": arm(reward=-0.1, fd=3.0, pair_accuracy=0.5),  # reward up, FD worse: hacked
        "rl_anchor": arm(reward=-0.3, fd=2.0),
        "dmdr_4step": arm(reward=-0.8, fd=1.1),
    }
    assert claim_dmd_regularises_rl(summary)["verdict"] == "held"
    # The judge gets worse instead of FD: still hacked.
    summary["rl_only"] = arm(reward=-0.1, fd=1.0, pair_accuracy=0.3)
    assert claim_dmd_regularises_rl(summary)["verdict"] == "held"
    # The anchor regularises better than DMD.
    summary["rl_anchor"] = arm(reward=-0.3, fd=0.9)
    assert claim_dmd_regularises_rl(summary)["verdict"] == "did not hold"
    # RL alone does not raise the reward: nothing to prevent.
    summary = {**summary, "rl_anchor": arm(fd=2.0), "rl_only": arm(reward=-2.5, fd=3.0, pair_accuracy=0.5)}
    assert claim_dmd_regularises_rl(summary)["verdict"] == "did not hold"
    # Everything within the seeds' spread.
    tie = {name: arm(1.0, reward=-1.0, fd=1.0, pair_accuracy=0.5) for name in ("stage1", "rl_only", "rl_anchor")}
    assert claim_dmd_regularises_rl({**tie, "dmdr_4step": arm(1.0, fd=1.0)})["verdict"] == "tie"


def test_claim_3_counts_clear_wins_within_the_annealing():
    early = {
        "baseline": {0: (2.0, 0.0), 5: (3.0, 0.1), 10: (2.5, 0.1), 20: (1.0, 0.1)},
        "+DynaDG+DynaRS": {0: (2.0, 0.0), 5: (2.0, 0.1), 10: (2.0, 0.1), 20: (5.0, 0.1)},
    }
    assert claim_dyna_cold_start(early, dynamic_steps=10)["verdict"] == "held"  # step 20 is after the annealing
    early["+DynaDG+DynaRS"][10] = (3.5, 0.1)
    assert claim_dyna_cold_start(early, dynamic_steps=10)["verdict"] == "tie"  # one win, one loss
    early["+DynaDG+DynaRS"][5] = (4.0, 0.1)
    assert claim_dyna_cold_start(early, dynamic_steps=10)["verdict"] == "did not hold"
    assert claim_dyna_cold_start({}, dynamic_steps=10)["verdict"] == "not run"


def test_claims_4_to_6():
    summary = {"stage1": arm(reward=-3.0, pair_accuracy=0.4), "stage1_rtdm": arm(reward=-2.0, pair_accuracy=0.5)}
    assert claim_rtdm(summary)["verdict"] == "held"
    summary["stage1_rtdm"] = arm(reward=-3.5)
    assert claim_rtdm(summary)["verdict"] == "did not hold"
    assert claim_rtdm({"stage1": arm(reward=-3.0)})["verdict"] == "not run"

    sweep = {
        "dmdr_w_low": arm(reward=-2.0, fd=1.0, recall=0.5),
        "dmdr_w_high": arm(reward=-0.5, fd=1.0, recall=0.3),  # FD tie, recall down: a trade-off
        "dmdr_4step": arm(reward=-1.0),
    }
    assert claim_reward_weight_tradeoff(sweep)["verdict"] == "held"
    sweep["dmdr_w_high"] = arm(reward=-0.5, fd=0.8, recall=0.6)  # better everywhere: no trade-off
    assert claim_reward_weight_tradeoff(sweep)["verdict"] == "did not hold"
    sweep["dmdr_w_high"] = arm(reward=-0.5, fd=1.0, recall=0.5)
    assert claim_reward_weight_tradeoff(sweep)["verdict"] == "tie"

    cfg = {"dmdr_cfg_off": arm(precision=0.6, recall=0.6), "dmdr_cfg_high": arm(precision=0.9, recall=0.2)}
    assert claim_cfg_tradeoff(cfg)["verdict"] == "held"
    cfg["dmdr_cfg_high"] = arm(precision=0.5, recall=0.2)
    assert claim_cfg_tradeoff(cfg)["verdict"] == "did not hold"
    assert [claim["claim"][:2] for claim in check_claims({}, {}, 10)] == ["1.", "2.", "3.", "4.", "5.", "6."]
    assert {claim["verdict"] for claim in check_claims({}, {}, 10)} == {"not run"}


# ---------------------------------------------------------------------------------------------- the machinery


TINY_BUDGET = ReproductionSettings(
    seeds=[0],
    stage1_steps=2,
    stage2_steps=1,
    dynamic_steps=1,
    train_batch_size=2,
    update_ratio=2,
    early_every=1,
    num_per_pair=1,
    early_num_per_pair=1,
    teacher_steps=2,
    real_num_per_pair=4,
)


@pytest.fixture(scope="module")
def tiny_reproduction(tmp_path_factory):
    torch.manual_seed(0)
    testbed = build_testbed(tmp_path_factory.mktemp("digits-cache"), TINY_SETTINGS, progress=False)
    reproduction = Reproduction(testbed, tmp_path_factory.mktemp("reproduce"), TINY_BUDGET, progress=False)
    seconds = reproduction.run(["teacher", "rl_anchor"])
    return reproduction, seconds


@pytest.mark.slow
def test_arms_share_the_stage1_checkpoint_and_are_evaluated(tiny_reproduction):
    """Slow (~25 s: every arm of the reproduction trains on a tiny testbed); the claim rules are checked against
    constructed results with known verdicts in `make test`."""
    reproduction, seconds = tiny_reproduction
    results = reproduction.results
    # Only the requested arms and the stage-1 run they resume from.
    assert set(results) == {"teacher", "stage1", "rl_anchor"} == set(seconds)
    assert (reproduction.output_dir / "seed-0" / "stage1" / "checkpoint-2").is_dir()
    # The resumed arm logs only its own (stage-2) step, with the reward switched on and DMD off.
    history = results["rl_anchor"][0].history
    assert [entry["step"] for entry in history] == [3]
    assert any(key.startswith("reward/") for key in history[0])
    assert "loss_anchor" in history[0] and "loss_dmd" not in history[0]
    # Stage 1 is scored at step 0 and then by the callback at every checkpoint (1, and the final 2).
    assert [step for step, _ in results["stage1"][0].early_fd] == [0, 1, 2]
    for name in ("teacher", "rl_anchor"):
        metrics = results[name][0].metrics
        assert {"pair_accuracy", "accuracy", "fd", "precision", "recall", "reward", "samples_per_second"} <= set(
            metrics
        )
        assert metrics["num_samples"] == 20  # one per held-out pair
    assert results["teacher"][0].metrics["nfe_per_sample"] == 4  # 2 CFG steps
    assert results["rl_anchor"][0].metrics["nfe_per_sample"] == 4
    assert all(math.isfinite(fd) and fd >= 0 for _, fd in results["stage1"][0].early_fd)


@pytest.mark.slow
def test_summaries_and_report(tiny_reproduction, tmp_path):
    """Slow: shares the tiny reproduction run above."""
    reproduction, seconds = tiny_reproduction
    summary = summarise(reproduction.results)
    assert summary["rl_anchor"]["pair_accuracy"][1] == 0.0  # one seed: no spread
    assert set(reward_curves(reproduction.results)) == {"rl_anchor"}
    early = {"baseline": early_fd_curves(reproduction.results, "stage1_no_dyna")}
    early["+DynaDG+DynaRS"] = early_fd_curves(reproduction.results, "stage1")
    claims = check_claims(summary, early, TINY_BUDGET.dynamic_steps)
    # The arms this run left out make their claims "not run", never a verdict.
    assert claims[0]["verdict"] == claims[2]["verdict"] == "not run"
    table = metrics_table(summary, ["teacher", "rl_anchor", "missing"]).splitlines()
    assert len(table) == 4 and table[2].startswith("| teacher |") and "±" in table[2]
    report = tmp_path / "reproduction.md"
    (tmp_path / "reproduction").mkdir()
    write_report(report, tmp_path / "reproduction", TINY_BUDGET, summary, early, claims, {}, seconds, "test")
    text = report.read_text()
    assert "## Which of the paper's claims held here" in text and "reproduction/early_fd.png" in text
    assert "**not run**" in text and "digit-pairs" in text
