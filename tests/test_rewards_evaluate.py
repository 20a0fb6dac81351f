"""`python -m diffusers_dmdr.evaluate` on the tiny offline SDXL pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from reward_fixtures import save_tiny_clip

from diffusers_dmdr.evaluate import evaluate_pipeline, main, write_report
from diffusers_dmdr.rewards import load_rewards
from diffusers_dmdr.testing import build_tiny_pipeline, tiny_pipeline
from diffusers_dmdr.utils import CAPTION_HEIGHT


PROMPTS = ["a cat", "a dog on a red sofa", "a lighthouse", "an oil painting of a tree", "a bowl of fruit"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_evaluate_pipeline_scores_every_prompt_reproducibly(tiny_clip_dir, tmp_path):
    pipeline = tiny_pipeline("sdxl")
    pipeline.set_progress_bar_config(disable=True)
    rewards = load_rewards(
        ["reward_fixtures.sum_of_pixels_reward:hinge=none", f"clip:model={tiny_clip_dir}"], "cpu", for_training=False
    )
    result, grid = evaluate_pipeline(pipeline, PROMPTS, rewards, batch_size=2, seed=7, num_inference_steps=2)
    assert list(result.scores) == ["sum_of_pixels_reward", "clip"]
    assert all(len(values) == len(PROMPTS) for values in result.scores.values())
    assert grid.shape == (5, 3, 64, 64) and result.samples_per_second > 0

    # Batch 1 (prompts 2-3) is generated with its own generator seeded seed + 1, independent of batch 0.
    with torch.no_grad():
        images = pipeline(
            prompt=PROMPTS[2:4],
            generator=torch.Generator("cpu").manual_seed(8),
            num_inference_steps=2,
            output_type="pt",
        ).images
    torch.testing.assert_close(torch.tensor(result.scores["sum_of_pixels_reward"][2:4]), images.mean(dim=(1, 2, 3)))

    summary = result.summary()
    brightness = torch.tensor(result.scores["sum_of_pixels_reward"], dtype=torch.float64)
    assert summary["sum_of_pixels_reward"] == pytest.approx(
        {"mean": brightness.mean().item(), "std": brightness.std().item()}
    )
    paths = write_report(result, grid, tmp_path)
    assert json.loads(paths["json"].read_text())["summary"] == summary  # JSON floats round-trip exactly
    assert f"| clip | {summary['clip']['mean']:.4f} | {summary['clip']['std']:.4f} |" in paths["markdown"].read_text()
    # Five 64 px samples tile 2 rows x 3 columns.
    assert Image.open(paths["grid"]).size == (3 * 64, 2 * 64)


def test_evaluate_cli_rejects_a_bad_reward_before_loading_anything(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit) as error:
        main(["--pipeline", str(tmp_path / "no-such-pipeline"), "--prompts", str(prompts)]
             + ["--reward", "clpi", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert error.value.code == 2
    assert "Unknown reward 'clpi'" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_clip_dir, tmp_path):
    """Slow (an ~18 s subprocess): loading, scoring and the teacher comparison run in-process in `make test`
    (test_evaluate_scores_a_dmdr_export_and_its_teacher_in_one_run), and so do the CLI's argument errors."""
    pipeline_dir = build_tiny_pipeline("sdxl", tmp_path / "tiny-sdxl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    output_dir = tmp_path / "eval"
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": tests_dir}
    command = [sys.executable, "-m", "diffusers_dmdr.evaluate", "--pipeline", str(pipeline_dir)]
    command += ["--prompts", str(prompts), "--output_dir", str(output_dir), "--num_inference_steps", "2"]
    command += ["--reward", f"clip:model={tiny_clip_dir}", "--reward", "reward_fixtures.sum_of_pixels_reward"]
    card = pipeline_dir / "README.md"
    card.write_text("---\nlicense: mit\n---\n# A student\n\n## Evaluation\n\nstale\n\n## How to use\n\nsnippet\n")
    command += ["--update_model_card"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert set(results["summary"]) == {"clip", "sum_of_pixels_reward"}
    assert len(results["scores"]["clip"]) == 3 and results["samples_per_second"] > 0
    assert results["settings"]["num_inference_steps"] == 2 and results["pipeline"] == str(pipeline_dir)
    assert "| sum_of_pixels_reward |" in completed.stdout
    assert (output_dir / "results.md").read_text().startswith("| reward | mean | std |")
    assert Image.open(output_dir / "samples.png").size == (3 * 64, 64)
    # The card's evaluation section is replaced in place; the rest of the card is untouched.
    card_text = card.read_text()
    assert "stale" not in card_text and card_text.count("## Evaluation") == 1
    assert "| sum_of_pixels_reward |" in card_text and "## How to use\n\nsnippet" in card_text


def test_evaluate_scores_a_dmdr_export_and_its_teacher_in_one_run(tmp_path):
    """A full export and a LoRA-only export load with the package (no --trust_remote_code); `--teacher` scores the
    teacher on the same prompts and seeds: one side-by-side table and a teacher-row / student-row grid."""
    import yaml
    from diffusers import StableDiffusionXLPipeline

    from diffusers_dmdr.adapters import adapter_state_dict, add_lora_adapter
    from diffusers_dmdr.evaluate import is_dmdr_export
    from diffusers_dmdr.export import LORA_WEIGHT_NAME, _copy_code, export_pipeline
    from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline

    teacher_dir = build_tiny_pipeline("sdxl", tmp_path / "teacher")
    scheduler = DMDRScheduler(prediction_type="epsilon", training_timesteps=[999.0, 499.0])
    full_dir = export_pipeline(
        FewStepDMDRPipeline.from_pretrained(str(teacher_dir), scheduler=scheduler), tmp_path / "full"
    )
    (full_dir / "dmdr_config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(teacher_dir)}))
    # A LoRA-only export: the student LoRA (B randomised, so that it changes the output) and the scheduler.
    lora_dir = tmp_path / "lora"
    stock = StableDiffusionXLPipeline.from_pretrained(str(teacher_dir))
    add_lora_adapter(stock.unet, "student", 4, 8, ["to_q", "to_v"])
    for name, parameter in stock.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.5)
    stock.save_lora_weights(
        lora_dir,
        unet_lora_layers=adapter_state_dict(stock.unet, "student"),
        unet_lora_adapter_metadata=stock.unet.peft_config["student"].to_dict(),
    )
    scheduler.save_pretrained(lora_dir / "scheduler")
    _copy_code(lora_dir)
    assert is_dmdr_export(str(full_dir)) and is_dmdr_export(str(lora_dir)) and not is_dmdr_export(str(teacher_dir))
    assert (lora_dir / LORA_WEIGHT_NAME).is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    common = ["--prompts", str(prompts), "--reward", "reward_fixtures.sum_of_pixels_reward:hinge=none"]
    common += ["--teacher_num_inference_steps", "2", "--batch_size", "2", "--seed", "5"]
    scores = {}
    for name, folder, teacher in (("full", full_dir, "auto"), ("lora", lora_dir, str(teacher_dir))):
        output_dir = tmp_path / f"eval-{name}"
        comparison = main(["--pipeline", str(folder), "--teacher", teacher, "--output_dir", str(output_dir)] + common)
        results = json.loads((output_dir / "results.json").read_text())
        assert set(results) == {"teacher", "student", "difference"}
        assert results["teacher"]["pipeline"] == str(teacher_dir) and results["student"]["pipeline"] == str(folder)
        assert results["teacher"]["settings"]["num_inference_steps"] == 2
        assert results["teacher"]["prompts"] == results["student"]["prompts"] == PROMPTS[:2]
        student, teacher_mean = comparison.student.summary(), comparison.teacher.summary()
        difference = student["sum_of_pixels_reward"]["mean"] - teacher_mean["sum_of_pixels_reward"]["mean"]
        assert results["difference"]["sum_of_pixels_reward"] == pytest.approx(difference)
        table = (output_dir / "results.md").read_text()
        assert table.startswith("| reward | teacher | student | student - teacher |")
        assert "| sum_of_pixels_reward |" in table and "samples/s" in table
        # Teacher row above student row (each captioned), one column per prompt (named in the header).
        assert Image.open(output_dir / "samples.png").size == (2 * 64, CAPTION_HEIGHT + 2 * (64 + CAPTION_HEIGHT))
        scores[name] = results["student"]["scores"]["sum_of_pixels_reward"]
    # The full export carries the teacher's weights; the LoRA export's student differs.
    assert scores["full"] != scores["lora"]
