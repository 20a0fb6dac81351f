"""`accelerate launch examples/train_dmdr/train.py` end to end on the tiny Wan 2.1 teacher (subprocesses, CPU): one
process, and 2-process DDP against one process of the same global batch.

Both are in `make test-slow` (a launch is ~30 s, three launches ~100 s, and `make test` ran 11 minutes on the shared
machine): the script path they take is the one tests/test_train_script_flux.py runs in `make test` for a flow
transformer family, and the Wan family code (training, resume, accumulation, rewards, export, loading routes) runs
in-process in `make test` (tests/test_wan_training.py, tests/test_families_wan.py)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_families_wan import NUM_FRAMES
from test_train_script import lora_b_norm, run_training, tiny_args


def wan_args(teacher: str, prompt_file: str, output_dir, batch_size: int = 2) -> list[str]:
    args = tiny_args(teacher, prompt_file, output_dir, steps=2, cold_start=1)
    args[args.index("--resolution") + 1] = "32"
    args[args.index("--train_batch_size") + 1] = str(batch_size)
    return args + [
        "--num_frames", str(NUM_FRAMES),
        "--update_ratio", "1",
        "--real_guidance_scale", "3.0",
        "--reward", "reward_fixtures.sum_of_pixels_reward:0.1:hinge=none",
        "--reward_frames", "0", "-1",
    ]  # fmt: skip


@pytest.mark.slow
def test_wan_lora_through_accelerate_launch(wan_dirs, prompt_file, tmp_path):
    """DMD, then DMD + a per-frame reward on the first and last frames; the export is a WanPipeline student with a
    GIF sample, and `family: auto` finds Wan from the folder."""
    output_dir = tmp_path / "run"
    run_training(
        wan_args(wan_dirs["2.1"], prompt_file, output_dir)
        + ["--validation_prompts", "a red cat", "--num_validation_images", "1", "--export_full_pipeline", "true"]
    )
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["nonfinite_steps"] == 0
    assert "loss_rl" not in summary["history"][0] and "loss_rl" in summary["history"][1]
    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["stock_pipeline"] == "WanPipeline" and model_index["call_defaults"]["num_frames"] == NUM_FRAMES
    assert Image.open(output_dir / "samples.gif").n_frames == NUM_FRAMES
    assert lora_b_norm(output_dir / "checkpoint-2" / "student_lora.safetensors") > 0
    assert lora_b_norm(output_dir / "checkpoint-2" / "fake_lora.safetensors") > 0


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_of_the_same_global_batch(wan_dirs, prompt_file, tmp_path):
    """Slow (two ~40 s launches): 2 processes x 1 clip and 1 process x 2 clips see the same draws (seeded per global
    sample), so the losses and both LoRAs agree to float32 reduction-order rounding."""
    comparable = ["--adam_epsilon", "1.0", "--learning_rate", "0.5", "--learning_rate_fake", "0.5"]
    run_training(wan_args(wan_dirs["2.1"], prompt_file, tmp_path / "one", batch_size=2) + comparable)
    run_training(wan_args(wan_dirs["2.1"], prompt_file, tmp_path / "ddp", batch_size=1) + comparable, processes=2)
    one = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert ddp["num_processes"] == 2 and ddp["replicas_identical"]
    for row_one, row_ddp in zip(one["history"], ddp["history"], strict=True):
        for key in ("loss_dmd", "loss_fake", "loss_rl"):
            if key in row_one:
                assert row_ddp[key] == pytest.approx(row_one[key], rel=1e-4), key
    for name in ("student_lora.safetensors", "fake_lora.safetensors"):
        weights_one = load_file(tmp_path / "one" / "checkpoint-2" / name)
        weights_ddp = load_file(tmp_path / "ddp" / "checkpoint-2" / name)
        assert set(weights_one) == set(weights_ddp) and weights_one
        for key, value in weights_one.items():
            torch.testing.assert_close(weights_ddp[key], value, rtol=1e-4, atol=1e-5, msg=key)
