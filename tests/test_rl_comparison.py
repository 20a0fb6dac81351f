"""`python -m diffusers_dmdr.digits.rl_comparison` (`make reproduce-rl`): the commands it runs, the cost it reports,
and the ranked table and issue-22 verdict it computes from run folders (written here; the runs themselves take
minutes each and are recorded in docs/rl_runs/)."""

import json

import pytest
import yaml

from diffusers_dmdr.digits import rl_comparison
from diffusers_dmdr.digits.recipe import DIGITS_RECIPE, rl_overrides


def config_of(arm: str, seed: int) -> dict:
    """The resolved config a run of `arm` exports: the digits recipe, the arm's RL overrides and its CLI flags."""
    values = {**DIGITS_RECIPE, "seed": seed}
    flags = list(rl_comparison.ARMS[arm].demo_args)
    options = dict(zip(flags[::2], flags[1::2], strict=True))
    if "--rl" in options:
        values.update(rl_overrides(options["--rl"], options["--rl_regularizer"]))
    for flag, value in options.items():
        if flag not in ("--rl", "--rl_regularizer"):
            values[flag[2:]] = int(value) if value.isdigit() else value if value.isalpha() else float(value)
    return values


def write_run(root, arm, seed, accuracy, fd, teacher=0.5, rewards=None):
    """A run folder as the demo leaves it: metrics.json, the exported student's config and training history."""
    folder = root / f"{arm}_seed{seed}"
    (folder / "student").mkdir(parents=True)
    rows = {
        "teacher (50 steps, CFG 3)": {"pair_accuracy": teacher, "fd": 4.4},
        "DMDR student (4 steps)": {"pair_accuracy": accuracy, "fd": fd, "precision": 0.9, "recall": 0.3},
        "real pairs (reference)": {"pair_accuracy": 0.95, "fd": 1.4},
    }
    (folder / "metrics.json").write_text(json.dumps({"rows": rows, "seconds": {"training": 300.0, "total": 360.0}}))
    config = config_of(arm, seed)
    (folder / "student" / "dmdr_config.yaml").write_text(yaml.safe_dump(config))
    history = [{"step": step, "loss": 1.0} for step in range(1, config["max_train_steps"] + 1)]
    if rewards is not None:
        for row in history:
            if row["step"] > config["cold_start_steps"]:
                row["rl/reward_mean"] = rewards[0] if row["step"] <= config["cold_start_steps"] + 50 else rewards[1]
    (folder / "student" / "train_summary.json").write_text(json.dumps({"history": history}))
    return folder


def test_demo_command_selects_the_arm_and_the_seed(tmp_path):
    command = rl_comparison.demo_command("grpo_kl", 2, tmp_path)
    assert command[1:3] == ["-m", "diffusers_dmdr.demo"]
    assert " --rl grpo --rl_regularizer kl " in " ".join(command) + " "
    assert command[command.index("--training_seed") + 1] == "2"
    assert command[command.index("--output_dir") + 1] == str(tmp_path / "grpo_kl_seed2")
    # The DMD-only student is the recipe without stage 2.
    dmd_only = rl_comparison.demo_command("dmd_only", 0, tmp_path)
    assert dmd_only[dmd_only.index("--cold_start_steps") + 1] == str(DIGITS_RECIPE["max_train_steps"])
    assert set(rl_comparison.DEFAULT_ARMS) == {"dmd_only", "refl", "grpo_dmd", "grpo_kl", "grpo_none", "dpo_dmd"}


def test_longer_runs_and_shared_trainer_flags_reach_every_arm(tmp_path, capsys):
    flags = ("--rl_weight", "10")
    command = rl_comparison.demo_command("grpo_dmd", 1, tmp_path, max_train_steps=1000, train_args=flags)
    joined = " ".join(command)
    assert " --max_train_steps 1000 " in joined and " --rl_weight 10 " in joined
    # The arm's own flags first, the shared ones after.
    assert joined.index("--rl_regularizer dmd") < joined.index("--rl_weight 10")
    # The DMD-only arm's cold start spans the longer run: it stays DMD only.
    dmd_only = rl_comparison.demo_command("dmd_only", 0, tmp_path, max_train_steps=1000)
    assert dmd_only[dmd_only.index("--cold_start_steps") + 1] == "1000"
    assert dmd_only[dmd_only.index("--max_train_steps") + 1] == "1000"
    with pytest.raises(SystemExit):
        rl_comparison.main(["--output_dir", str(tmp_path), "--max_train_steps", "60", "--collect_only"])
    assert "--max_train_steps must exceed the recipe's cold start (60 steps), got 60" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arm", "student_grad", "guidance", "reference", "reward_images"),
    [
        # Batch 16, TTUR 3, 4 steps, groups of 4 (docs/rl.md's cost table).
        ("refl", 16, 48, 0, 16),
        ("dmd_only", 16, 48, 0, 0),
        ("grpo_dmd", 16, 48, 0, 16),
        ("grpo_kl", 16, 0, 16, 16),
        ("grpo_none", 16, 0, 0, 16),
        ("dpo_dmd", 8, 24, 8, 16),
        ("grpo_dmd_ie2", 32, 96, 0, 16),
        # Every transition: 3 more student passes per row (4 steps); the KL arm has no DMD term, so no drawn-step pass,
        # and its reference runs on the transitions' states.
        ("grpo_dmd_all", 64, 48, 0, 16),
        ("grpo_kl_all", 48, 0, 48, 16),
    ],
)
def test_cost_per_generator_update(arm, student_grad, guidance, reference, reward_images):
    cost = rl_comparison.nfe_per_update(config_of(arm, 0))
    assert cost == {
        "student_grad": student_grad,
        "guidance": guidance,
        "reference": reference,
        "fake_train": 48,
        "sampling": 192,
        "reward_images": reward_images,
    }


def test_table_ranks_arms_and_checks_the_issue_target(tmp_path, capsys):
    write_run(tmp_path, "dmd_only", 0, 0.55, 6.0)
    write_run(tmp_path, "dmd_only", 1, 0.51, 8.0)
    write_run(tmp_path, "grpo_dmd", 0, 0.62, 6.5, rewards=(0.6, 0.7))
    write_run(tmp_path, "grpo_dmd", 1, 0.60, 8.5, rewards=(0.5, 0.6))
    write_run(tmp_path, "grpo_none", 0, 0.2, 30.0, rewards=(0.6, 0.4))
    (tmp_path / "not_an_arm_seed0").mkdir()  # ignored, as are unfinished runs
    (tmp_path / "grpo_kl_seed0").mkdir()
    summaries = rl_comparison.collect(tmp_path)
    assert set(summaries) == {"dmd_only", "grpo_dmd", "grpo_none"}
    assert summaries["grpo_dmd"].stat("pair_accuracy") == pytest.approx((0.61, 0.0141421), rel=1e-4)
    assert summaries["grpo_dmd"].runs[0]["reward_start"] == pytest.approx(0.6)
    assert summaries["grpo_dmd"].runs[0]["reward_end"] == pytest.approx(0.7)
    table = rl_comparison.ranked_table(summaries)
    ranked = [line.split(" | ")[1] for line in table.splitlines()[2:5]]
    assert ranked == ["DMD + GRPO", "DMD only (no RL)", "GRPO alone"]
    assert "| 0.610 ± 0.014 | +11.0 | 0.620 / 0.600 | 7.50 ± 1.41 | 1.07 |" in table
    assert "0.550 -> 0.650" in table and "0.600 -> 0.400" in table
    verdict = rl_comparison.issue_checks(summaries)
    assert verdict[0].endswith(": met.") and "FD 1.07x" in verdict[0]
    # The paper's central claim against GRPO alone: more accuracy and a lower FD hold; recall (0.3 each) ties.
    assert rl_comparison.regulariser_checks(summaries) == [
        "DMD + GRPO against GRPO alone: accuracy holds, FD holds, recall holds."
    ]
    # The same runs against a DMD-only student with a much better FD miss the FD limit.
    write_run(tmp_path / "b", "dmd_only", 0, 0.55, 3.0)
    write_run(tmp_path / "b", "grpo_dmd", 0, 0.62, 6.5)
    assert rl_comparison.issue_checks(rl_comparison.collect(tmp_path / "b"))[0].endswith("NOT met.")
    # The command line: the table and the raw figures go to --docs.
    rl_comparison.main(["--output_dir", str(tmp_path), "--collect_only", "--docs", str(tmp_path / "docs" / "t.md")])
    assert "DMD + GRPO" in (tmp_path / "docs" / "t.md").read_text()
    raw = json.loads((tmp_path / "docs" / "t.json").read_text())
    assert raw["grpo_dmd"]["1"]["pair_accuracy"] == 0.60
    assert "NOT met" not in capsys.readouterr().out


def test_archived_records_give_the_same_figures(tmp_path):
    folder = write_run(tmp_path / "runs", "grpo_kl", 1, 0.47, 21.0, rewards=(0.57, 0.60))
    target = rl_comparison.archive(folder, tmp_path / "docs")
    assert sorted(path.name for path in target.iterdir()) == ["dmdr_config.yaml", "metrics.json", "reward_curve.json"]
    assert rl_comparison.read_run(target) == rl_comparison.read_run(folder)


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        rl_comparison.main(["--jobs", "0", "--output_dir", str(tmp_path)])
    assert raised.value.code == 2 and "--jobs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished run"):
        rl_comparison.main(["--output_dir", str(tmp_path), "--collect_only"])


def test_a_larger_evaluation_replaces_the_demo_figures_where_present(tmp_path, capsys, monkeypatch):
    """`--evaluation_num_per_pair N` builds the table from each run's re-evaluation file (the demo's 160 samples leave a
    sampling error as large as the differences between arms); a run without that file is named and left out."""
    name = rl_comparison.evaluation_name(64, 50_000)
    assert name == "evaluation_n64_seed50000.json"
    for seed, accuracy in ((0, 0.70), (1, 0.66)):
        folder = write_run(tmp_path, "grpo_dmd", seed, 0.60, 6.0)
        rows = {
            "teacher (50 steps, CFG 3)": {"pair_accuracy": 0.55, "fd": 3.0},
            "DMDR student (4 steps)": {
                "pair_accuracy": accuracy,
                "fd": 5.0,
                "precision": 0.9,
                "recall": 0.3,
                "num_samples": 1280,
            },
            "real pairs (reference)": {"pair_accuracy": 0.95, "fd": 1.0},
        }
        (folder / name).write_text(json.dumps({"num_per_pair": 64, "seed": 50_000, "rows": rows}))
    write_run(tmp_path, "dmd_only", 0, 0.55, 6.0)  # never re-evaluated
    summaries = rl_comparison.collect(tmp_path, evaluation=name)
    assert set(summaries) == {"grpo_dmd"}
    assert summaries["grpo_dmd"].stat("pair_accuracy")[0] == pytest.approx(0.68)
    assert summaries["grpo_dmd"].stat("teacher_pair_accuracy")[0] == pytest.approx(0.55)
    assert "dmd_only_seed0: no evaluation_n64_seed50000.json, left out of the table" in capsys.readouterr().err
    assert "Evaluation: 1280 samples" in rl_comparison.ranked_table(summaries)
    # No DMD-only run in this table: its FD ratio column says so rather than "nan".
    assert "| 5.00 ± 0.00 | - |" in rl_comparison.ranked_table(summaries)
    # Every DMD-regularised RL arm in the table gets the issue's headline check, not only the recipe arms.
    assert rl_comparison._dmd_rl("grpo_dmd_all") and not rl_comparison._dmd_rl("grpo_kl_all")
    assert not rl_comparison._dmd_rl("dmd_only") and not rl_comparison._dmd_rl("refl")
    # Without it, the demo's own figures.
    assert rl_comparison.collect(tmp_path)["grpo_dmd"].stat("pair_accuracy")[0] == pytest.approx(0.60)
    # --collect_only never samples: it reads the files that exist.
    rl_comparison.main(["--output_dir", str(tmp_path), "--collect_only", "--evaluation_num_per_pair", "64"])
    assert "| 0.680 ± 0.028 | +13.0 |" in capsys.readouterr().out

    # --skip_training trains nothing (the arms' missing seeds stay missing); finished runs holding the file are reused.
    def no_training(*args, **kwargs):
        raise AssertionError("--skip_training must not train")

    monkeypatch.setattr(rl_comparison, "run_arm", no_training)
    rl_comparison.main(
        ["--output_dir", str(tmp_path), "--skip_training", "--arms", "grpo_dmd", "--evaluation_num_per_pair", "64"]
    )
    assert "| 0.680 ± 0.028 |" in capsys.readouterr().out
    # The archive keeps the evaluation beside the run's record.
    archived = rl_comparison.archive(tmp_path / "grpo_dmd_seed0", tmp_path / "archive")
    assert (archived / name).is_file()


def test_the_kl_arm_is_labelled_with_the_weight_its_runs_trained_with(tmp_path):
    folder = write_run(tmp_path, "grpo_kl", 0, 0.45, 18.0)
    config_file = folder / "student" / "dmdr_config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(rl_regularizer="kl", rl_kl_weight=0.4)  # e.g. given by --train_args "--rl_kl_weight 0.4"
    config_file.write_text(yaml.safe_dump(config))
    write_run(tmp_path, "grpo_dmd", 0, 0.60, 6.0)
    summaries = rl_comparison.collect(tmp_path)
    assert summaries["grpo_kl"].label == "GRPO + KL (Flow-GRPO's), weight 0.4"
    assert summaries["grpo_dmd"].label == "DMD + GRPO"
    assert "| GRPO + KL (Flow-GRPO's), weight 0.4 |" in rl_comparison.ranked_table(summaries)
    assert rl_comparison.regulariser_checks(summaries)[0].startswith(
        "DMD + GRPO against GRPO + KL (Flow-GRPO's), weight 0.4:"
    )
