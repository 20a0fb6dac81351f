"""The reproduction machinery (`make reproduce`) on a reduced testbed and tiny budgets: shared stage 1, resumed arms,
early-checkpoint FD, summaries, claim checks and the report."""

import math

import pytest
import torch

from diffusers_dmdr.digits import DigitsBuildSettings, build_testbed
from diffusers_dmdr.digits.reproduce import (
    Reproduction,
    ReproductionSettings,
    check_claims,
    early_fd_curves,
    mean_std,
    metrics_table,
    reward_curves,
    summarise,
    write_report,
)


TINY_SETTINGS = DigitsBuildSettings(
    vae_steps=2, unet_steps=2, reward_steps=2, eval_steps=2, gate_num_per_digit=1, gate_num_inference_steps=2
)
TINY_BUDGET = ReproductionSettings(
    seeds=[0],
    stage1_steps=2,
    stage2_steps=1,
    dynamic_steps=1,
    train_batch_size=2,
    update_ratio=2,
    early_every=1,
    num_per_digit=1,
    early_num_per_digit=1,
    teacher_steps=2,
)


@pytest.fixture(scope="module")
def tiny_reproduction(tmp_path_factory):
    torch.manual_seed(0)
    testbed = build_testbed(tmp_path_factory.mktemp("digits-cache"), TINY_SETTINGS, progress=False)
    reproduction = Reproduction(testbed, tmp_path_factory.mktemp("reproduce"), TINY_BUDGET, progress=False)
    seconds = reproduction.run(["teacher", "dmdr_4step", "rl_anchor"])
    return reproduction, seconds


def test_arms_share_the_stage1_checkpoint_and_are_evaluated(tiny_reproduction):
    reproduction, seconds = tiny_reproduction
    results = reproduction.results
    # Only the requested arms and the stage-1 run they resume from.
    assert set(results) == {"teacher", "stage1", "dmdr_4step", "rl_anchor"} == set(seconds)
    assert (reproduction.output_dir / "seed-0" / "stage1" / "checkpoint-2").is_dir()
    # Resumed arms log only their own (stage-2) steps, with the reward switched on.
    for arm in ("dmdr_4step", "rl_anchor"):
        history = results[arm][0].history
        assert [entry["step"] for entry in history] == [3]
        assert any(key.startswith("reward/") for key in history[0])
    assert "loss_anchor" in results["rl_anchor"][0].history[0]
    assert "loss_dmd" not in results["rl_anchor"][0].history[0]
    # Stage 1 is scored at step 0 and at every checkpoint.
    assert [step for step, _ in results["stage1"][0].early_fd] == [0, 1, 2]
    for arm in ("teacher", "dmdr_4step"):
        metrics = results[arm][0].metrics
        assert {"accuracy", "fd", "precision", "recall", "reward", "samples_per_second"} <= set(metrics)
        assert metrics["num_samples"] == 10
    assert results["teacher"][0].metrics["nfe_per_sample"] == 4  # 2 CFG steps
    assert results["dmdr_4step"][0].metrics["nfe_per_sample"] == 4


def test_summaries_claims_and_report(tiny_reproduction, tmp_path):
    reproduction, seconds = tiny_reproduction
    summary = summarise(reproduction.results)
    assert summary["dmdr_4step"]["accuracy"][1] == 0.0  # one seed: no spread
    assert set(reward_curves(reproduction.results)) == {"dmdr_4step", "rl_anchor"}
    early = {"baseline": early_fd_curves(reproduction.results, "stage1_no_dyna")}
    early["+DynaDG+DynaRS"] = early_fd_curves(reproduction.results, "stage1")
    claims = check_claims(summary, early, TINY_BUDGET.dynamic_steps)
    assert [claim["claim"][:2] for claim in claims] == ["1.", "2.", "3.", "6.", "7."]
    assert all(claim["verdict"] in ("held", "did not hold", "inconclusive") for claim in claims)
    table = metrics_table(summary, ["teacher", "dmdr_4step", "missing"]).splitlines()
    assert len(table) == 4 and table[2].startswith("| teacher |") and "±" in table[2]
    report = tmp_path / "reproduction.md"
    (tmp_path / "reproduction").mkdir()
    write_report(report, tmp_path / "reproduction", TINY_BUDGET, summary, early, claims, {}, seconds, "test")
    text = report.read_text()
    assert "## Which of the paper's claims held here" in text and "reproduction/early_fd.png" in text


def test_mean_std_and_claim_rules():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([float("nan"), 2.0]) == (2.0, 0.0)

    def arm(**metrics):
        return {key: (value, 0.01) for key, value in metrics.items()}

    summary = {
        "teacher": arm(reward=-0.1, accuracy=0.99, fd=0.8, samples_per_second=10.0, nfe_per_sample=100),
        "dmd_4step": arm(reward=-0.1, accuracy=0.99, fd=1.0, precision=0.9, recall=0.3),
        "dmdr_4step": arm(
            reward=-0.01, accuracy=1.0, fd=1.2, precision=0.95, recall=0.2, samples_per_second=150.0, nfe_per_sample=4
        ),
        "rl_only": arm(reward=-0.001, fd=3.0, recall=0.05),
        "rl_anchor": arm(reward=-0.002, fd=2.0),
        "dmdr_cfg_off": arm(precision=0.7, recall=0.6),
        "dmdr_cfg_high": arm(precision=0.97, recall=0.1),
    }
    early = {"baseline": {0: (2.0, 0.0), 5: (3.0, 0.1)}, "+DynaDG+DynaRS": {0: (2.0, 0.0), 5: (2.0, 0.1)}}
    verdicts = [claim["verdict"] for claim in check_claims(summary, early, dynamic_steps=5)]
    assert verdicts == ["held", "held", "held", "held", "held"]
    summary["rl_only"] = arm(reward=-0.001, fd=1.0)  # RL alone no worse on FD: claim 2 fails
    assert check_claims(summary, early, dynamic_steps=5)[1]["verdict"] == "did not hold"
