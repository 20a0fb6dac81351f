"""FSDP2 on CPU: accelerate takes its FSDP path on accelerators only, so two gloo processes shard the training module
with torch's `fully_shard` by the shipped config's policy (tests/fsdp_worker.py) and compare against DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


WORKER = Path(__file__).parent / "fsdp_worker.py"


def assert_same_run(row, reference, rel=1e-5):
    for row_losses, reference_losses in zip(row["losses"], reference["losses"], strict=True):
        assert row_losses == pytest.approx(reference_losses, rel=rel)
    for network in ("student", "fake"):
        assert set(row[network]) == set(reference[network]) and len(reference[network]) > 0
        for key, value in reference[network].items():
            assert row[network][key] == pytest.approx(value, rel=rel, abs=1e-6), key


@pytest.fixture(scope="module")
def fsdp_results(tiny_teacher_dirs, prompt_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER)]
    completed = subprocess.run(
        [*command, tiny_teacher_dirs["sdxl"], prompt_file, str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((output / "results.json").read_text(encoding="utf-8"))


def test_fsdp2_and_ddp_runs_match_the_one_process_run(fsdp_results, tiny_teacher_dirs, prompt_file, tmp_path):
    """Two processes of batch 1 (sharded or replicated) and one process of batch 2 are the same run: same prompts,
    per-sample draws, global-batch gradients and process-averaged logs. Stated tolerance: 1e-5 relative (only the
    reduction order differs)."""
    from conftest import tiny_config
    from fsdp_worker import COMMON, PROMPTS, summarise

    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer

    ddp, fsdp = fsdp_results["ddp"], fsdp_results["fsdp2"]
    assert ddp["num_processes"] == fsdp["num_processes"] == 2
    assert fsdp["sharded"] and not ddp["sharded"]
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, **{**COMMON, "train_batch_size": 2})
    trainer = DMDRTrainer(config, get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"]), PROMPTS)
    history = trainer.train()
    fake = {k: v for k, v in trainer.training_module.state_dict().items() if ".fake." in k}
    one_process = summarise(history, trainer.student_state_dict(), fake)
    assert_same_run(ddp, one_process)
    assert_same_run(fsdp, one_process)


def test_ddp_resume_continues_exactly(fsdp_results):
    ddp = fsdp_results["ddp"]
    resumed = ddp["resumed"]
    # The resumed run logged its own step (the second) only; its weights are those of the uninterrupted run.
    assert len(resumed["losses"]) == 1
    assert resumed["losses"][0] == pytest.approx(ddp["losses"][1], rel=1e-6)
    assert_same_run({**resumed, "losses": ddp["losses"]}, ddp, rel=1e-6)


def test_fsdp2_keeps_the_base_frozen_without_gradients(fsdp_results):
    fsdp = fsdp_results["fsdp2"]
    assert fsdp["frozen_base_changed"] == []
    assert fsdp["frozen_grads"] == 0 and fsdp["student_grads"] == 0
    # The fake adapter's gradients are sharded: each process holds half of the first dimension.
    for local_shape, full_shape in fsdp["fake_grad_shapes_local_vs_full"]:
        assert local_shape[0] * 2 == full_shape[0] and local_shape[1:] == full_shape[1:]


def test_fsdp2_sharded_checkpoint_round_trips(fsdp_results):
    assert fsdp_results["fsdp2"]["checkpoint_round_trip_exact"]
