"""FSDP2 on CPU: accelerate takes its FSDP path on accelerators only, so two gloo processes shard the training module
with torch's `fully_shard` by the shipped config's policy (tests/fsdp_worker.py) and compare against DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


WORKER = Path(__file__).parent / "fsdp_worker.py"


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


def test_fsdp2_run_matches_the_data_parallel_run(fsdp_results):
    ddp, fsdp = fsdp_results["ddp"], fsdp_results["fsdp2"]
    assert ddp["num_processes"] == fsdp["num_processes"] == 2
    assert fsdp["sharded"] and not ddp["sharded"]
    # Same data, draws and global gradients: only the reduction order differs (stated tolerance: 1e-5 relative).
    for row_ddp, row_fsdp in zip(ddp["losses"], fsdp["losses"], strict=True):
        assert row_fsdp == pytest.approx(row_ddp, rel=1e-5)
    for network in ("student", "fake"):
        assert set(fsdp[network]) == set(ddp[network]) and len(ddp[network]) > 0
        for key, value in ddp[network].items():
            assert fsdp[network][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_fsdp2_keeps_the_base_frozen_without_gradients(fsdp_results):
    fsdp = fsdp_results["fsdp2"]
    assert fsdp["frozen_base_changed"] == []
    assert fsdp["frozen_grads"] == 0 and fsdp["student_grads"] == 0
    # The fake adapter's gradients are sharded: each process holds half of the first dimension.
    for local_shape, full_shape in fsdp["fake_grad_shapes_local_vs_full"]:
        assert local_shape[0] * 2 == full_shape[0] and local_shape[1:] == full_shape[1:]


def test_fsdp2_sharded_checkpoint_round_trips(fsdp_results):
    assert fsdp_results["fsdp2"]["checkpoint_round_trip_exact"]
