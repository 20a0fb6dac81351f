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


def test_evaluate_cli_end_to_end(tiny_clip_dir, tmp_path):
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
