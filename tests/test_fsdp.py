"""accelerate's own FSDP2 path on 2 CPU processes (gloo), with the shipped fsdp2.yaml's settings, against DDP and
against a one-process run of the same global batch (tests/fsdp_worker.py, tests/accelerate_fsdp.py).

One launch per student mode: LoRA (with the DDP runs) in `make test`, the full student in `make test-slow`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "fsdp_worker.py"
FSDP2_CONFIG = ROOT / "examples" / "train_dmdr" / "accelerate_configs" / "fsdp2.yaml"
# Only the reduction order differs between these runs: stated tolerance 1e-5 relative (1e-6 absolute for weights).
SAME_RUN = dict(rtol=1e-5, atol=1e-6)
MODES = ["lora", pytest.param("full", marks=pytest.mark.slow)]


def launch_command(config_file: Path, output: Path, teacher_dir: str, prompt_file: str, mode: str, *args: str):
    """`accelerate launch --config_file <config_file> [args] tests/fsdp_worker.py ...` and its environment: CPU
    processes, one torch thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *args]
    command += ["--dynamo_backend", "no", str(WORKER), teacher_dir, prompt_file, str(output), mode]
    return command, env


def read_results(output: Path) -> dict:
    results = json.loads((output / "results.json").read_text(encoding="utf-8"))
    for name, row in results.items():
        row["weights"] = {
            network: load_file(output / f"{name}_{network}.safetensors") for network in ("student", "fake")
        }
    return results


def launch_worker(teacher_dir: str, prompt_file: str, output: Path, mode: str, mixed_precision: str = "no") -> dict:
    """The shipped fsdp2.yaml through `accelerate launch`, on 2 CPU processes: fp32 (`--mixed_precision no`, with the
    DDP runs) so that the runs compare with the one-process run at float32 rounding, or the file's own bf16
    (`mixed_precision=None`, FSDP2 only)."""
    args = ["--num_processes", "2"] + (["--mixed_precision", mixed_precision] if mixed_precision else [])
    command, env = launch_command(FSDP2_CONFIG, output, teacher_dir, prompt_file, mode, *args)
    command += ["--with_ddp"] if mixed_precision == "no" else []
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-6000:]
    return read_results(output)


@pytest.fixture(scope="module", params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_process_run(tiny_teacher_dirs, prompt_file, tmp_path_factory):
    """`one_process_run(mode)`: the one-process run of the same global batch (2), with its export, once per mode."""
    from conftest import tiny_config
    from fsdp_worker import COMMON, PROMPTS, losses_of, weights_of

    from diffusers_dmdr.export import export_from_trainer
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer

    cache = {}

    def run(mode: str) -> dict:
        if mode not in cache:
            output = tmp_path_factory.mktemp(f"one-process-{mode}")
            overrides = {**COMMON, "train_batch_size": 2, "training_mode": mode}
            config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, output, **overrides)
            trainer = DMDRTrainer(config, get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"]), PROMPTS)
            initial_weights = weights_of(trainer)
            trainer.train()
            cache[mode] = {
                "num_processes": trainer.accelerator.num_processes,
                "losses": losses_of(trainer.history),
                "weights": weights_of(trainer),
                "initial_weights": initial_weights,
                "export_dir": str(export_from_trainer(trainer)),
            }
        return cache[mode]

    return run


@pytest.fixture(scope="module")
def runs(mode, one_process_run, tiny_teacher_dirs, prompt_file, tmp_path_factory) -> dict:
    """The 2-process runs of `mode` and the one-process run of the same global batch."""
    output = tmp_path_factory.mktemp(f"fsdp-{mode}")
    results = launch_worker(tiny_teacher_dirs["sdxl"], prompt_file, output, mode)
    return {**results, "one_process": one_process_run(mode)}


def assert_same_losses(losses, reference_losses, rtol):
    assert len(reference_losses) > 0
    for row, reference in zip(losses, reference_losses, strict=True):
        assert row == pytest.approx(reference, rel=rtol)


def assert_same_weights(weights, reference, rtol, atol):
    for network in ("student", "fake"):
        assert set(weights[network]) == set(reference[network]) and len(reference[network]) > 0, network
        for key, value in reference[network].items():
            torch.testing.assert_close(weights[network][key], value, rtol=rtol, atol=atol, msg=key)


def test_accelerate_takes_its_fsdp2_path_with_the_shipped_settings(runs, mode):
    """The test-only switch (tests/accelerate_fsdp.py) still works with the installed accelerate: `prepare` shards
    the module per backbone block with DTensor parameters, with fsdp2.yaml's state-dict type and policy."""
    switch = runs["fsdp2"]["switch"]
    assert runs["fsdp2"]["num_processes"] == 2 and runs["fsdp2"]["sharded"]
    assert switch["distributed_type"] == switch["partial_state_distributed_type"] == "DistributedType.FSDP"
    assert switch["is_fsdp2"] and switch["model_is_fsdp_module"] and switch["all_parameters_dtensor"]
    assert switch["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"
    assert switch["auto_wrap_policy"] == "transformer_auto_wrap_policy" and switch["reshard_after_forward"] is True
    # The root plus every block in the backbone's `_no_split_modules` (a full student's blocks too).
    assert switch["backbone_blocks"] > 0 and switch["fsdp_units"] == switch["backbone_blocks"] + 1
    # --mixed_precision no: no cast policy (the bf16 launch of the same file is checked in its own test).
    assert switch["param_dtype"] == "None"


def test_fsdp2_and_ddp_runs_match_the_one_process_run(runs, mode):
    """Two processes of batch 1 (sharded or replicated) and one process of batch 2 are the same run: same prompts,
    per-sample draws, global-batch gradients and process-averaged logs."""
    one = runs["one_process"]
    assert one["num_processes"] == 1
    for name in ("fsdp2", "ddp"):
        assert runs[name]["num_processes"] == 2, name
        assert runs[name]["sharded"] == (name == "fsdp2")
        assert_same_losses(runs[name]["losses"], one["losses"], SAME_RUN["rtol"])
        assert_same_weights(runs[name]["weights"], one["weights"], **SAME_RUN)
    # Both networks trained far beyond the tolerance: the equality above is not that of untouched weights.
    for network, weights in one["weights"].items():
        initial = one["initial_weights"][network]
        assert max(float((weights[k] - initial[k]).abs().max()) for k in weights) > 1e-2, network


def test_ddp_resume_continues_exactly(runs, mode):
    ddp, resumed = runs["ddp"], runs["ddp_resumed"]
    # The resumed run logged its own step (the second) only; its weights are those of the uninterrupted run.
    assert resumed["start_step"] == 1 and len(resumed["losses"]) == 1
    assert resumed["losses"][0] == pytest.approx(ddp["losses"][1], rel=1e-6)
    assert_same_weights(resumed["weights"], ddp["weights"], rtol=1e-6, atol=1e-7)


def test_fsdp2_sharded_checkpoint_resumes_to_the_straight_run(runs, mode):
    """`save_state` writes a sharded checkpoint (torch.distributed.checkpoint, no full-state file); a new run that
    `load_state`s it after step 1 ends with the uninterrupted run's weights."""
    fsdp2, resumed = runs["fsdp2"], runs["fsdp2_resumed"]
    assert fsdp2["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    files = fsdp2["checkpoint_files"]
    assert any(name.startswith("pytorch_model_fsdp_0/") and name.endswith(".distcp") for name in files), files
    assert any(name.startswith("optimizer_0/") and name.endswith(".distcp") for name in files), files
    assert not any(name.endswith(".safetensors") for name in files), files
    assert resumed["start_step"] == 1 and len(resumed["losses"]) == 1
    assert resumed["losses"][0] == pytest.approx(fsdp2["losses"][1], rel=1e-6)
    assert_same_weights(resumed["weights"], fsdp2["weights"], rtol=1e-6, atol=1e-7)


def exported_weight_files(folder: Path) -> list[str]:
    """The export's safetensors files (the checkpoints beside them in `output_dir` are not part of it)."""
    names = (str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
    return sorted(name for name in names if not name.startswith("checkpoint-"))


def test_fsdp2_export_gathers_the_student_and_equals_the_one_process_export(runs, mode):
    exported = Path(runs["fsdp2"]["export_dir"])
    reference = Path(runs["one_process"]["export_dir"])
    files = exported_weight_files(reference)
    assert files == exported_weight_files(exported)
    expected = "unet/diffusion_pytorch_model.safetensors" if mode == "full" else "pytorch_lora_weights.safetensors"
    assert expected in files
    for name in files:
        tensors, reference_tensors = load_file(exported / name), load_file(reference / name)
        assert set(tensors) == set(reference_tensors) and tensors, name
        for key, value in reference_tensors.items():
            torch.testing.assert_close(tensors[key], value, **SAME_RUN, msg=f"{name}: {key}")


def test_fsdp2_keeps_the_base_frozen_without_gradients(runs, mode):
    fsdp = runs["fsdp2"]
    assert fsdp["dtypes"] == {"frozen": ["torch.float32"], "student": ["torch.float32"], "fake": ["torch.float32"]}
    assert fsdp["frozen_base_compared"] > 0 and fsdp["frozen_base_changed"] == []
    assert fsdp["frozen_grads"] == 0 and fsdp["student_grads"] == 0
    # The fake adapter's gradients are sharded: each process holds half of the first dimension.
    for local_shape, full_shape in fsdp["fake_grad_shapes_local_vs_full"]:
        assert local_shape[0] * 2 == full_shape[0] and local_shape[1:] == full_shape[1:]


@pytest.mark.slow
def test_the_shipped_bf16_setting_trains_the_fp32_run_to_bf16_rounding(
    one_process_run, tiny_teacher_dirs, prompt_file, tmp_path
):
    """fsdp2.yaml as shipped (`mixed_precision: bf16`, a ~2-minute launch): the teacher loads in bf16, FSDP2 keeps the
    frozen base bf16 and the adapters fp32 and computes and reduces in bf16. Same run as fp32 to bf16 rounding (8-bit
    mantissa, 3.9e-3 per rounding): stated tolerance 1e-2 relative for the weights (measured 1.7e-3) and 5e-2 for the
    losses (measured 1.3e-2); the sharded resume stays exact."""
    bf16 = launch_worker(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, "lora", mixed_precision=None)
    fsdp2, resumed, fp32 = bf16["fsdp2"], bf16["fsdp2_resumed"], one_process_run("lora")
    assert fsdp2["switch"]["param_dtype"] == fsdp2["switch"]["reduce_dtype"] == "torch.bfloat16"
    assert fsdp2["dtypes"] == {"frozen": ["torch.bfloat16"], "student": ["torch.float32"], "fake": ["torch.float32"]}
    assert fsdp2["frozen_base_compared"] > 0 and fsdp2["frozen_base_changed"] == []
    assert_same_losses(fsdp2["losses"], fp32["losses"], rtol=5e-2)
    for network in ("student", "fake"):
        weights, reference = fsdp2["weights"][network], fp32["weights"][network]
        assert set(weights) == set(reference)
        difference = sum(float((weights[k] - reference[k]).square().sum()) for k in reference) ** 0.5
        assert difference < 1e-2 * sum(float(reference[k].square().sum()) for k in reference) ** 0.5, network
    assert_same_losses(resumed["losses"], fsdp2["losses"][1:], rtol=1e-6)
    assert_same_weights(resumed["weights"], fsdp2["weights"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_two_node_files_start_one_world_that_trains_as_one_process(
    one_process_run, tiny_teacher_dirs, prompt_file, tmp_path
):
    """two_nodes_fsdp2_node0.yaml and _node1.yaml launched here as two "machines" of one process each (node 0's
    address 127.0.0.1): one 2-process FSDP2 world, the same run as one process of the global batch."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launches = []
    for rank in (0, 1):
        config = FSDP2_CONFIG.with_name(f"two_nodes_fsdp2_node{rank}.yaml")
        args = ["--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1"]
        args += ["--main_process_port", port]
        command, env = launch_command(config, tmp_path, tiny_teacher_dirs["sdxl"], prompt_file, "lora", *args)
        launches.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [launch.communicate(timeout=900) for launch in launches]
    for launch, (stdout, stderr) in zip(launches, outputs, strict=True):
        assert launch.returncode == 0, stdout[-2000:] + stderr[-6000:]
    fsdp2, one = read_results(tmp_path)["fsdp2"], one_process_run("lora")
    assert fsdp2["num_processes"] == 2 and fsdp2["switch"]["is_fsdp2"]
    assert_same_losses(fsdp2["losses"], one["losses"], SAME_RUN["rtol"])
    assert_same_weights(fsdp2["weights"], one["weights"], **SAME_RUN)
