"""Export of trained students: parity with the trainer's sampler, the three loading routes, the model card, the
standalone entry point and the Hub push (against a local HTTP server)."""

import copy
import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_dmdr.adapters import STUDENT_ADAPTER
from diffusers_dmdr.export import LORA_WEIGHT_NAME, export_checkpoint, export_from_trainer, export_pipeline
from diffusers_dmdr.families import get_family
from diffusers_dmdr.lora_formats import KOHYA_LORA_WEIGHT_NAME
from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline, pipeline_dmdr, scheduling_dmdr
from diffusers_dmdr.trainer import DMDRTrainer


TESTS_DIR = Path(__file__).parent
PROMPTS = ["a red cat", "a blue dog"]
# One run per case the export must handle: LoRA with and without the full pipeline, full fine-tuning, 1 and 4 steps.
RUNS = {
    # alpha != rank in two LoRA runs, so that a file read at the wrong strength (alpha / rank) shows.
    "sdxl-4step": {
        "family": "sdxl",
        "training_mode": "lora",
        "num_student_steps": 4,
        "export_full_pipeline": True,
        "lora_alpha": 8,
    },
    "sdxl-1step": {"family": "sdxl", "training_mode": "lora", "num_student_steps": 1, "export_full_pipeline": False},
    "sd3-4step-full": {"family": "sd3", "training_mode": "full", "num_student_steps": 4},
    "sd3-1step": {
        "family": "sd3",
        "training_mode": "lora",
        "num_student_steps": 1,
        "export_full_pipeline": False,
        "lora_alpha": 2,
    },
    "sd15-2step": {"family": "sd15", "training_mode": "lora", "num_student_steps": 2},
    # FLUX.1: a trained guidance embedding other than the stock default, which the export must carry.
    "flux-2step": {"family": "flux", "training_mode": "lora", "num_student_steps": 2, "guidance_embedding_scale": 2.5},
    "flux2-2step-sde": {
        "family": "flux2",
        "training_mode": "lora",
        "num_student_steps": 2,
        "backward_simulation": "sde",
    },
    "zimage-4step": {"family": "zimage", "training_mode": "lora", "num_student_steps": 4},
    "qwenimage-4step": {"family": "qwenimage", "training_mode": "lora", "num_student_steps": 4},
}
TEACHER_CARDS = {
    "sdxl": "---\nlicense: openrail++\n---\n# A tiny SDXL teacher\n",
    "sd15": "---\nlicense: creativeml-openrail-m\n---\n# A tiny SD1.5 teacher\n",
    "sd3": "---\nlicense: other\nlicense_name: tiny-community-license\nlicense_link: LICENSE.md\n---\n# A tiny SD3\n",
    "flux": "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n---\n# A tiny FLUX.1 [dev]\n",
    "flux2": "---\nlicense: apache-2.0\n---\n# A tiny FLUX.2 [klein]\n",
    "zimage": "---\nlicense: apache-2.0\n---\n# A tiny Z-Image teacher\n",
    "qwenimage": "---\nlicense: apache-2.0\n---\n# A tiny Qwen-Image teacher\n",
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment for a fresh Python: its own HF cache (remote-code modules land there), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return env


def run_python(code: str, args: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result


def perturb_student(trainer: DMDRTrainer) -> None:
    """Make the student differ from the teacher: LoRA B starts at zero, and a full student starts as a copy."""
    with torch.no_grad():
        for name, parameter in trainer.student_model.named_parameters():
            if trainer.config.training_mode == "full":
                parameter.add_(0.05 * torch.randn_like(parameter))
            elif "lora_B" in name and f".{STUDENT_ADAPTER}." in name:
                # The same weight change whatever alpha / rank (parity tolerances assume this size of change).
                parameter.normal_(std=0.5 * trainer.config.lora_rank / trainer.config.lora_alpha)


@pytest.fixture(scope="module")
def teacher_dirs(tiny_teacher_dirs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny teachers with a model card, so that the export can inherit its license."""
    root = tmp_path_factory.mktemp("export-teachers")
    copies = {}
    for family, source in tiny_teacher_dirs.items():
        copies[family] = Path(shutil.copytree(source, root / family))
        (copies[family] / "README.md").write_text(TEACHER_CARDS[family], encoding="utf-8")
    return copies


@pytest.fixture(scope="module")
def exported(teacher_dirs, prompt_file, tmp_path_factory):
    """`exported(name)`: a tiny trainer of `RUNS[name]` with a perturbed student, checkpointed then exported by
    `export_from_trainer` into its own output_dir (built on first use, once per module)."""
    runs = {}

    def build(name: str) -> SimpleNamespace:
        if name not in runs:
            options = dict(RUNS[name])
            family = options.pop("family")
            output_dir = tmp_path_factory.mktemp(name)
            config = tiny_config(
                str(teacher_dirs[family]),
                prompt_file,
                output_dir,
                validation_prompts=PROMPTS,
                num_validation_images=1,
                hub_model_id=f"dmdr-tests/{name}",
                **options,
            )
            trainer = DMDRTrainer(config, get_family(family).load_teacher(str(teacher_dirs[family])), PROMPTS)
            perturb_student(trainer)
            trainer.history = [{"step": 2, "loss_dmd": 0.25, "reward/clip": 0.31, "heldout_reward/pickscore": 0.2}]
            checkpoint = trainer.save_checkpoint()
            export_dir = export_from_trainer(trainer)
            runs[name] = SimpleNamespace(
                name=name,
                family=family,
                trainer=trainer,
                export_dir=export_dir,
                checkpoint=checkpoint,
                teacher_dir=teacher_dirs[family],
                hub_id=config.hub_model_id,
                full_pipeline=config.training_mode == "full" or config.export_full_pipeline,
            )
        return runs[name]

    return build


def load_student(run) -> FewStepDMDRPipeline:
    """The exported student through route 1 of its card: the saved pipeline, or the teacher + LoRA."""
    if run.full_pipeline:
        pipeline = FewStepDMDRPipeline.from_pretrained(str(run.export_dir))
    else:
        stock = get_family(run.family).pipeline_class().from_pretrained(str(run.teacher_dir))
        stock.load_lora_weights(str(run.export_dir))
        scheduler = DMDRScheduler.from_pretrained(str(run.export_dir), subfolder="scheduler")
        pipeline = FewStepDMDRPipeline.from_pipe(stock, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def student_latents(pipeline, seed: int = 7) -> torch.Tensor:
    latents = pipeline(list(PROMPTS), height=64, width=64, generator=seeded(seed), output_type="latent").images
    return unpacked(pipeline, latents)


def unpacked(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """The trainer's `(B, C, H, W)` layout of a stock pipeline's latent output (Qwen-Image returns packed tokens)."""
    if type(getattr(pipeline, "vae", None)).__name__ == "AutoencoderKLQwenImage":
        from diffusers_dmdr.families.qwenimage import unpack_latents

        size = 64 // 2 ** len(pipeline.vae.temperal_downsample)
        return unpack_latents(latents, size, size)
    return latents


def student_images(pipeline, seed: int = 7) -> torch.Tensor:
    return pipeline(PROMPTS, height=64, width=64, generator=seeded(seed), output_type="pt").images


# ------------------------------------------------------------------------------------------------------------------
# Parity with the trainer's sampler
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_exported_student_reproduces_the_trainer_sampler(name, exported):
    run = exported(name)
    trainer_latents = run.trainer.sample_latents(PROMPTS, generator=seeded(7))
    if run.family in ("flux", "flux2"):
        # The stock FLUX pipelines return packed (or de-normalised) latents: compare decoded images instead.
        trainer_latents, sample = run.trainer.decode(trainer_latents), student_images
    else:
        sample = student_latents
    pipeline = load_student(run)
    # The exact trained grid, prediction type and re-noising rule travel in the scheduler config.
    assert torch.equal(pipeline.scheduler.timesteps, run.trainer.scheduler.timesteps)
    for key in ("training_timesteps", "prediction_type", "deterministic", "num_train_timesteps"):
        assert pipeline.scheduler.config[key] == run.trainer.scheduler.config[key]
    # Same generator, same initial and per-step noise: the same samples (fused LoRA weights differ by rounding).
    torch.testing.assert_close(sample(pipeline), trainer_latents, rtol=1e-4, atol=1e-4)
    # ... and not trivially: the teacher under the same sampler gives other samples.
    teacher = get_family(run.family).pipeline_class().from_pretrained(str(run.teacher_dir))
    teacher_pipeline = FewStepDMDRPipeline.from_pipe(teacher, scheduler=pipeline.scheduler)
    teacher_pipeline.set_progress_bar_config(disable=True)
    assert not torch.allclose(sample(teacher_pipeline), trainer_latents, atol=1e-2)


@pytest.mark.parametrize("name", ["sdxl-4step", "sd3-4step-full", "flux-2step"])
def test_plain_route_with_a_stock_scheduler_follows_the_trained_sampler(name, exported):
    """Route 3 of the card (stock pipeline and scheduler, no custom code) on the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler, SD3Transformer2DModel

    run = exported(name)
    family = get_family(run.family)
    timesteps = run.trainer.scheduler.config.training_timesteps
    if run.family == "sdxl":
        stock = family.pipeline_class().from_pretrained(str(run.teacher_dir))
        stock.load_lora_weights(str(run.export_dir))
        stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
        schedule = {"timesteps": [int(t) for t in timesteps]}
    elif run.family == "sd3":
        transformer = SD3Transformer2DModel.from_pretrained(str(run.export_dir), subfolder="transformer")
        stock = family.pipeline_class().from_pretrained(str(run.teacher_dir), transformer=transformer)
        stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            stock.scheduler.config, shift=1.0, stochastic_sampling=not run.trainer.scheduler.config.deterministic
        )
        schedule = {"sigmas": [t / 1000 for t in timesteps], "max_sequence_length": 128, "guidance_scale": 0.0}
    if run.family == "flux":
        stock = family.pipeline_class().from_pretrained(str(run.teacher_dir))
        stock.load_lora_weights(str(run.export_dir))
        # Dynamic shifting off: the trained sigmas are already the teacher's shifted grid.
        stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            stock.scheduler.config, shift=1.0, use_dynamic_shifting=False
        )
        # The card's call: the trained guidance embedding and prompt length the export stores.
        call_defaults = json.loads((run.export_dir / "model_index.json").read_text())["call_defaults"]
        assert call_defaults == {"guidance_scale": 2.5, "max_sequence_length": 16}
        schedule = {"sigmas": [t / 1000 for t in timesteps], **call_defaults}
    elif run.family == "sdxl":
        schedule["guidance_scale"] = 0.0
    stock.set_progress_bar_config(disable=True)
    latents = stock(prompt=PROMPTS, height=64, width=64, generator=seeded(7), output_type="latent", **schedule).images
    if run.family == "flux":
        latents = stock._unpack_latents(latents, 64, 64, stock.vae_scale_factor)
    trainer_latents = run.trainer.sample_latents(PROMPTS, generator=seeded(7))
    # Flow students trained on round(1000 t) (the released code); the stock scheduler feeds 1000 t unrounded, so the
    # route is close (the teacher under this sampler is off by more than 1e-2) but not at 1e-3.
    tolerance = 1e-2 if run.family in ("sd3", "flux") else 1e-3
    torch.testing.assert_close(latents, trainer_latents, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["zimage-4step", "qwenimage-4step"])
def test_new_flow_families_stock_pipeline_lora_and_stock_scheduler_route(name, exported):
    """The stock ZImagePipeline / QwenImagePipeline + `load_lora_weights` + the stock scheduler of the student's
    `stock_scheduler_recipe()` (no custom code) follows the trained sampler on the same noise; the full exported
    pipeline also loads through `DiffusionPipeline` with the repository's code."""
    import diffusers
    from diffusers import DiffusionPipeline

    run = exported(name)
    family = get_family(run.family)
    recipe = run.trainer.scheduler.stock_scheduler_recipe()
    stock = family.pipeline_class().from_pretrained(str(run.teacher_dir))
    stock.load_lora_weights(str(run.export_dir))
    # (Qwen-Image's scheduler stretches sigmas to its terminal 0.02: the identity on its own default grid, which ends
    # there already.)
    stock.scheduler = getattr(diffusers, recipe["class_name"]).from_config(
        stock.scheduler.config, **recipe["from_config_kwargs"]
    )
    stock.set_progress_bar_config(disable=True)
    guidance_off = {"guidance_scale": 0.0} if run.family == "zimage" else {"true_cfg_scale": 1.0}
    latents = stock(
        list(PROMPTS),
        height=64,
        width=64,
        generator=seeded(7),
        output_type="latent",
        **guidance_off,
        **recipe["call_kwargs"],
    ).images
    trainer_latents = run.trainer.sample_latents(PROMPTS, generator=seeded(7))
    # Z-Image's 4-step grid is integer in model units (exact); Qwen-Image's is not, and the stock scheduler feeds the
    # model 1000 t unrounded (the recipe says so).
    assert recipe["exact"] == (run.family == "zimage")
    tolerance = 1e-4 if recipe["exact"] else 1e-2
    torch.testing.assert_close(unpacked(stock, latents), trainer_latents, rtol=tolerance, atol=tolerance)
    remote = DiffusionPipeline.from_pretrained(str(run.export_dir), trust_remote_code=True)
    assert (
        type(remote).__name__ == "FewStepDMDRPipeline" and remote.config.stock_pipeline == family.pipeline_class_name
    )
    # The card's stock route names this family's classes and call defaults, not SD3's.
    card = (run.export_dir / "README.md").read_text(encoding="utf-8")
    assert f"from diffusers import FlowMatchEulerDiscreteScheduler, {family.pipeline_class_name}" in card
    assert "SD3Transformer2DModel" not in card and "max_sequence_length=128" not in card
    if run.family == "zimage":
        assert "guidance_scale=0.0" in card
    else:
        assert "true_cfg_scale=1.0" in card and "shift=1.0, use_dynamic_shifting=False" in card


# ------------------------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------------------------
def test_full_pipeline_folder_layout_and_code(exported):
    run = exported("sdxl-4step")
    folder = run.export_dir
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == ["pipeline_dmdr", "FewStepDMDRPipeline"]
    assert model_index["scheduler"] == ["scheduling_dmdr", "DMDRScheduler"]
    assert model_index["unet"] == ["diffusers", "UNet2DConditionModel"] and model_index["transformer"] == [None, None]
    # The code files are the package's own, byte for byte.
    assert filecmp.cmp(folder / "pipeline_dmdr.py", pipeline_dmdr.__file__, shallow=False)
    assert filecmp.cmp(folder / "scheduler" / "scheduling_dmdr.py", scheduling_dmdr.__file__, shallow=False)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert next((folder / component).glob("*.safetensors"), None) is not None
    # safetensors only (the `.bin` files are the checkpoint's optimizer states).
    assert all(path.parent.name.startswith("checkpoint-") for path in folder.rglob("*.bin"))
    # The checkpoints next to the export are left alone.
    assert (run.checkpoint / "student_lora.safetensors").is_file()
    # The LoRA file is in diffusers format and carries its config, so loading rebuilds the same rank and alpha.
    with safe_open(folder / LORA_WEIGHT_NAME, "pt") as lora_file:
        keys = list(lora_file.keys())
        metadata = json.loads(lora_file.metadata()["lora_adapter_metadata"])
    assert keys and all(key.startswith("unet.") and ".lora_" in key for key in keys)
    assert metadata["unet.r"] == run.trainer.config.lora_rank
    assert metadata["unet.lora_alpha"] == run.trainer.config.lora_alpha
    image = Image.open(folder / "samples.png")
    assert image.size == (64, 64 * len(PROMPTS))


def test_export_layout_names_the_package_code_files_and_classes():
    """`model_index.json` of an export names the code by these strings: they must follow `pipelines/`."""
    from diffusers_dmdr import export_layout

    assert Path(pipeline_dmdr.__file__).stem == export_layout.PIPELINE_MODULE
    assert Path(scheduling_dmdr.__file__).stem == export_layout.SCHEDULER_MODULE
    assert FewStepDMDRPipeline.__name__ == export_layout.PIPELINE_CLASS
    assert DMDRScheduler.__name__ == export_layout.SCHEDULER_CLASS


def test_lora_only_export_has_code_and_scheduler_but_no_pipeline(exported):
    folder = exported("sd3-1step").export_dir
    assert not (folder / "model_index.json").exists() and not (folder / "transformer").exists()
    assert (folder / LORA_WEIGHT_NAME).is_file() and (folder / "pipeline_dmdr.py").is_file()
    scheduler = DMDRScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert scheduler.config.training_timesteps == [1000.0] and scheduler.config.prediction_type == "flow"
    assert (folder / "scheduler" / "scheduling_dmdr.py").is_file()


@pytest.mark.parametrize("name", ["sdxl-4step", "sd3-1step", "zimage-4step", "qwenimage-4step"])
def test_kohya_lora_file_maps_every_module_and_loads_like_the_diffusers_file(name, exported):
    """The ComfyUI / Automatic1111 file, read back by diffusers' own non-diffusers-LoRA path (`load_lora_weights`),
    gives the diffusers file's output; every module of the PEFT file is in it."""
    from peft.tuners.lora import LoraLayer

    run = exported(name)
    family = get_family(run.family)
    peft_file, kohya_file = (
        load_file(run.export_dir / LORA_WEIGHT_NAME),
        load_file(run.export_dir / KOHYA_LORA_WEIGHT_NAME),
    )
    peft_modules = {key.rsplit(".lora_", 1)[0] for key in peft_file}
    kohya_modules = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in kohya_file}
    assert len(kohya_modules) == len(peft_modules) and len(peft_file) == 2 * len(peft_modules)
    if run.family == "sdxl":
        assert all(module.startswith("lora_unet_") for module in kohya_modules)
        assert len(kohya_file) == 3 * len(peft_modules)  # down, up and alpha per module
        assert {kohya_file[f"{module}.alpha"].item() for module in kohya_modules} == {8.0}
    else:
        assert kohya_modules == peft_modules and len(kohya_file) == 2 * len(peft_modules)

    def sample(weight_name: str | None):
        pipeline = family.pipeline_class().from_pretrained(str(run.teacher_dir))
        pipeline.set_progress_bar_config(disable=True)
        if weight_name is not None:
            pipeline.load_lora_weights(str(run.export_dir), weight_name=weight_name)
            backbone = getattr(pipeline, family.backbone_name)
            layers = sum(isinstance(module, LoraLayer) for module in backbone.modules())
            assert layers == len(peft_modules), weight_name  # no module dropped on loading
        kwargs = {"max_sequence_length": 32} if family.is_flow else {}
        return pipeline(
            PROMPTS[:1], num_inference_steps=2, guidance_scale=0.0, height=64, width=64, generator=seeded(3),
            output_type="latent", **kwargs,
        ).images  # fmt: skip

    diffusers_output = sample(LORA_WEIGHT_NAME)
    torch.testing.assert_close(sample(KOHYA_LORA_WEIGHT_NAME), diffusers_output, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sample(None), diffusers_output, atol=1e-3)  # and the LoRA does change the output


def test_loaded_pipeline_saved_and_re_exported_round_trips(exported, tmp_path):
    from diffusers import DiffusionPipeline

    run = exported("sdxl-4step")
    original = FewStepDMDRPipeline.from_pretrained(str(run.export_dir))
    original.set_progress_bar_config(disable=True)
    expected = student_latents(original)
    original_index = json.loads((run.export_dir / "model_index.json").read_text())

    export_pipeline(original, tmp_path / "again")
    # A pipeline loaded as remote code (class from the folder's own file) re-exports the same way.
    remote = DiffusionPipeline.from_pretrained(str(tmp_path / "again"), trust_remote_code=True)
    assert type(remote).__name__ == "FewStepDMDRPipeline" and type(remote.scheduler).__name__ == "DMDRScheduler"
    export_pipeline(remote, tmp_path / "twice")
    for folder in (tmp_path / "again", tmp_path / "twice"):
        index = json.loads((folder / "model_index.json").read_text())
        assert {k: v for k, v in index.items() if k != "_name_or_path"} == {
            k: v for k, v in original_index.items() if k != "_name_or_path"
        }
        assert filecmp.cmp(folder / "pipeline_dmdr.py", pipeline_dmdr.__file__, shallow=False)
    reloaded = FewStepDMDRPipeline.from_pretrained(str(tmp_path / "twice"))
    reloaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(student_latents(reloaded), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DMDRScheduler"):
        export_pipeline(get_family("sdxl").pipeline_class().from_pretrained(str(run.teacher_dir)), tmp_path / "no")


def test_re_export_replaces_the_previous_export_and_keeps_the_run(exported, tmp_path, caplog, monkeypatch):
    """A LoRA-only re-export without samples into a folder that holds a full export with samples, a checkpoint and
    logs: the previous export's files go (no stale samples.png or unet/), the run's stay; a failed re-export
    leaves the previous export exactly as it was."""
    from diffusers_dmdr import export as export_module
    from diffusers_dmdr.export import StudentWeights, write_export

    run = exported("sdxl-4step")
    folder = Path(shutil.copytree(run.export_dir, tmp_path / "run"))
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_text("tracker data")
    (folder / "train_summary.json").write_text("{}")
    before = folder_digest(folder)
    config = copy.deepcopy(run.trainer.config)
    config.validation_prompts = None
    lora_config = run.trainer.guidance_model.peft_config[STUDENT_ADAPTER].to_dict()
    weights = StudentWeights(
        lora_state_dict=load_file(run.checkpoint / "student_lora.safetensors"), lora_config=lora_config
    )
    family = get_family("sdxl")

    def broken_card(*args, **kwargs):
        raise RuntimeError("card failed")

    monkeypatch.setattr(export_module, "make_model_card", broken_card)
    with pytest.raises(RuntimeError, match="card failed"):
        write_export(folder, config, family, run.trainer.scheduler, weights)
    assert folder_digest(folder) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no staging folder left behind
    monkeypatch.undo()

    with caplog.at_level(logging.WARNING, logger="diffusers_dmdr.export"):
        write_export(folder, config, family, run.trainer.scheduler, weights)
    after = folder_digest(folder)
    for stale in ("samples.png", "model_index.json", "unet/config.json", "vae/config.json"):
        assert stale in before and stale not in after, stale
    kept = [path for path in before if path.startswith(("checkpoint-", "logs/")) or path == "train_summary.json"]
    assert kept and all(after.get(path) == before[path] for path in kept)
    assert {"README.md", LORA_WEIGHT_NAME, KOHYA_LORA_WEIGHT_NAME, "scheduler/scheduler_config.json"} <= set(after)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    # The local teacher has no Hub id: the export says what to do.
    assert any("--base_model org/name" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sdxl-4step", "sd3-1step"])
def test_model_card_metadata_and_content(name, exported):
    run = exported(name)
    card = ModelCard.load(run.export_dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"dmdr", "distillation", "few-step", "lora", "text-to-image"} <= set(data["tags"])
    if run.family == "sdxl":
        assert data["license"] == "openrail++" and "stable-diffusion-xl" in data["tags"]
    else:
        assert (data["license"], data["license_name"]) == ("other", "tiny-community-license")
        assert data["license_link"] == "LICENSE.md"
    assert data["widget"][0]["output"]["url"] == "samples.png"
    # A local teacher folder is not a Hub id: no base_model rather than a wrong one (the entry point's
    # --base_model sets it, see the standalone test).
    assert "base_model" not in data
    text = card.text
    assert "TODO" not in text and "hf_" not in text
    for timestep in run.trainer.scheduler.config.training_timesteps:
        assert f"| {timestep:g} |" in text
    assert "![samples](samples.png)" in text and "a blue dog" in text
    assert "`reward/clip` | 0.31" in text and "`heldout_reward/pickscore` | 0.2" in text
    assert len(re.findall(r"```python\n", text)) == 3
    assert text.count("### ") == 3 and "trust_remote_code=True" in text and "load_lora_weights" in text
    # Which file each tool takes.
    comfy = text.split("## ComfyUI / Automatic1111\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{KOHYA_LORA_WEIGHT_NAME}`" in comfy and "models/loras/" in comfy and f"`{LORA_WEIGHT_NAME}`" in comfy
    if run.family == "sdxl":
        assert "sampler `lcm`" in comfy and "sgm_uniform" in comfy and "<lora:pytorch_lora_weights_kohya:1>" in comfy
    else:
        assert "sampler `euler`" in comfy and "any scheduler" in comfy and "Automatic1111 does not run" in comfy


# ------------------------------------------------------------------------------------------------------------------
# Standalone entry point
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sdxl-4step", "sd3-4step-full"])
def test_export_entry_point_rebuilds_the_trainer_export(name, exported, tmp_path):
    run = exported(name)
    folder = export_checkpoint(run.checkpoint, tmp_path / "standalone", base_model=f"dmdr-tests/{run.family}-teacher")
    produced = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    reference = {str(p.relative_to(run.export_dir)) for p in run.export_dir.rglob("*") if p.is_file()}
    assert produced == {p for p in reference if not p.startswith("checkpoint-")}
    for path in produced:
        if path.endswith(".safetensors"):
            expected, actual = load_file(run.export_dir / path), load_file(folder / path)
            assert expected.keys() == actual.keys()
            for key in expected:
                torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6)
        elif path.endswith((".py", "config.json")) and "tokenizer" not in path:
            # Tokenizer files are left out: a fast tokenizer that has encoded once saves its truncation state.
            assert (folder / path).read_bytes() == (run.export_dir / path).read_bytes(), path
    # The grid is sampled by the exported pipeline here and by the trainer there: equal up to 8-bit rounding.
    grid = np.asarray(Image.open(folder / "samples.png"), dtype=np.int16)
    assert np.abs(grid - np.asarray(Image.open(run.export_dir / "samples.png"), dtype=np.int16)).max() <= 1
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == f"dmdr-tests/{run.family}-teacher"
    assert f"https://huggingface.co/dmdr-tests/{run.family}-teacher" in card.text
    assert "exported checkpoint | checkpoint-0" in card.text
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------------
# A fresh process: the card's snippets, all three routes
# ------------------------------------------------------------------------------------------------------------------
SNIPPET_RUNNER = textwrap.dedent(
    """
    import json, logging, re, sys, warnings
    from pathlib import Path

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.name}: {record.getMessage()}")

    # diffusers logs through its own logger tree; repository code loaded with trust_remote_code through
    # "diffusers_modules". Python warnings count when diffusers or the snippet itself raised them.
    for name in ("diffusers", "diffusers_modules"):
        logging.getLogger(name).addHandler(Collect(logging.WARNING))
    warnings.simplefilter("always")
    results = []
    for readme, repo_id, folder, teacher in json.loads(sys.argv[1]):
        blocks = re.findall(r"```python\\n(.*?)```", Path(readme).read_text(), flags=re.S)
        for route, code in enumerate(blocks, start=1):
            messages, namespace = [], {}
            code = code.replace(f'"{repo_id}"', repr(folder)).replace('"<teacher-hub-id>"', repr(teacher))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(code, namespace)
            messages += [
                f"{item.category.__name__}: {item.message}" for item in caught
                if "diffusers" in item.filename or item.filename == "<string>" or "diffusers" in str(item.message)
            ]
            pipe = namespace["pipe"]
            scheduler = pipe.scheduler
            results.append({
                "readme": readme,
                "route": route,
                "pipeline": type(pipe).__name__,
                "scheduler": type(scheduler).__name__,
                "module": type(pipe).__module__,
                "image_size": list(namespace["image"].size),
                "timesteps": [float(t) for t in scheduler.timesteps],
                "diffusers_warnings": messages,
            })
    print("RESULTS" + json.dumps(results))
    """
)


def test_card_snippets_load_the_export_three_ways_in_a_fresh_process(exported, tmp_path):
    """Every snippet of the SDXL and SD3 cards (full and LoRA-only exports) runs in one fresh Python without a
    warning from diffusers."""
    runs = [exported(name) for name in ("sdxl-4step", "sd3-4step-full", "sd3-1step")]
    jobs = [(str(run.export_dir / "README.md"), run.hub_id, str(run.export_dir), str(run.teacher_dir)) for run in runs]
    result = run_python(SNIPPET_RUNNER, [json.dumps(jobs)], subprocess_env(tmp_path))
    results = json.loads(result.stdout.split("RESULTS", 1)[1])
    assert len(results) == 3 * len(runs)
    for run in runs:
        routes = {entry["route"]: entry for entry in results if entry["readme"].startswith(str(run.export_dir))}
        assert set(routes) == {1, 2, 3}
        for entry in routes.values():
            assert entry["image_size"] == [64, 64]
            assert entry["diffusers_warnings"] == [], (run.name, entry["route"], entry["diffusers_warnings"])
        trained = [float(t) for t in run.trainer.scheduler.timesteps]
        # Routes 1 and 2 sample with the trained scheduler; route 1 without remote code, route 2 with the repo's.
        for route in (1, 2):
            assert routes[route]["pipeline"] == "FewStepDMDRPipeline" and routes[route]["scheduler"] == "DMDRScheduler"
            assert routes[route]["timesteps"] == trained
        assert routes[1]["module"] == "diffusers_dmdr.pipelines.pipeline_dmdr"
        assert routes[2]["module"].startswith("diffusers_modules")
        assert routes[3]["pipeline"] == get_family(run.family).pipeline_class_name
        # The stock scheduler of route 3 runs the trained grid.
        if run.family == "sdxl":
            assert routes[3]["scheduler"] == "LCMScheduler" and routes[3]["timesteps"] == trained


# ------------------------------------------------------------------------------------------------------------------
# Push to the Hub, against a local server
# ------------------------------------------------------------------------------------------------------------------
PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import DiffusionPipeline
    from diffusers_dmdr.export import HubUploadError, push_to_hub
    from diffusers_dmdr.export_cli import main
    from diffusers_dmdr.pipelines import FewStepDMDRPipeline

    folder, repo_id = sys.argv[1], sys.argv[2]
    # The retry command of a failed upload: re-export the run's latest checkpoint in place, then push.
    main(["--checkpoint", folder, "--output_dir", folder, "--push_to_hub", "--hub_model_id", repo_id, "--hub_private"])
    # Download what was pushed, through routes 1 and 2, and sample.
    latents = {}
    for route, pipe in (
        ("package", FewStepDMDRPipeline.from_pretrained(repo_id)),
        ("remote_code", DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)),
        ("local", FewStepDMDRPipeline.from_pretrained(folder)),
    ):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(3)
        latents[route] = pipe(["a red cat"], generator=generator, output_type="latent").images
    print("DOWNLOAD-DIFF" + json.dumps({r: (l - latents["local"]).abs().max().item() for r, l in latents.items()}))
    try:
        push_to_hub(folder, "dmdr-tests/fail-upload")
    except HubUploadError as error:
        print("UPLOAD-ERROR" + json.dumps(str(error)))
    """
)
TOKEN = "hf_dmdrTestToken0123456789"


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_push_uploads_the_export_loads_from_the_hub_and_a_failed_upload_says_how_to_retry(exported, tmp_path):
    from hub_server import FakeHub

    run = exported("sdxl-4step")
    folder = Path(shutil.copytree(run.export_dir, tmp_path / "run"))
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_text("tracker data")
    with FakeHub() as hub:
        env = subprocess_env(tmp_path, HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN)
        del env["HF_HUB_OFFLINE"]
        result = run_python(PUSH_SCRIPT, [str(folder), run.hub_id], env)
    local_files = folder_digest(folder)
    uploaded = hub.repos[run.hub_id]
    assert uploaded["private"] is True
    # Everything of the export, nothing of the run: no checkpoints, no logs.
    expected = {path for path in local_files if not path.startswith(("checkpoint-", "logs/"))}
    assert set(uploaded["files"]) == expected
    assert {"README.md", LORA_WEIGHT_NAME, "samples.png", "model_index.json", "unet/config.json"} <= expected
    for path in expected:
        assert hashlib.sha256(uploaded["files"][path]).hexdigest() == local_files[path]
    # The token authenticated the requests, and went nowhere else.
    assert f"Bearer {TOKEN}" in hub.authorizations
    assert TOKEN not in result.stdout + result.stderr
    assert not any(TOKEN.encode() in content for content in uploaded["files"].values())
    assert not any(TOKEN.encode() in path.read_bytes() for path in folder.rglob("*") if path.is_file())
    # The pushed repo loads from the Hub without and with remote code, and samples as the local folder does.
    download_diff = json.loads(result.stdout.split("DOWNLOAD-DIFF", 1)[1].splitlines()[0])
    assert download_diff == {"package": 0.0, "remote_code": 0.0, "local": 0.0}
    # The refused upload: a clear error naming the retry command; the folder is exactly as it was.
    message = json.loads(result.stdout.split("UPLOAD-ERROR", 1)[1].strip())
    assert "dmdr-tests/fail-upload" in message and "403" in message and "intact" in message
    assert (
        f"--checkpoint {folder} --output_dir {folder} --push_to_hub --hub_model_id dmdr-tests/fail-upload" in message
    )
    assert folder_digest(folder) == local_files
    assert hub.repos["dmdr-tests/fail-upload"]["files"] == {}


@pytest.mark.parametrize("name", ["flux-2step", "flux2-2step-sde"])
def test_flux_exports_store_the_teachers_grid_its_mu_and_the_call_defaults(name, exported, caplog):
    """The dynamic-shift grid is stored exactly (the teacher scheduler's own sigmas at 64 px and 2 steps) with the
    `mu` it was built at; the pipeline config carries the trained prompt length and (FLUX.1) guidance embedding."""
    run = exported(name)
    family = get_family(run.family)
    teacher_config = run.trainer.pipeline.scheduler.config
    scheduler_config = json.loads((run.export_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["training_timesteps"] == family.student_grid(2, None, teacher_config, 64, 8)[0]
    assert scheduler_config["grid_mu"] == family.dynamic_shift_mu(64, 2, teacher_config, 8)
    pipeline = FewStepDMDRPipeline.from_pretrained(str(run.export_dir))
    expected = {"max_sequence_length": 16 if run.family == "flux" else 64}
    if run.family == "flux":
        expected["guidance_scale"] = 2.5
    assert pipeline.config.call_defaults == expected
    assert pipeline.config.stock_pipeline == family.pipeline_class_name
    # Sampling at another resolution keeps the trained grid and says so.
    pipeline.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        pipeline(PROMPTS[:1], height=128, width=128, generator=seeded(0), output_type="latent")
    assert "another resolution" in caplog.text
    card = (run.export_dir / "README.md").read_text()
    assert family.pipeline_class_name in card and "use_dynamic_shifting=False" in card
    # Route 2: diffusers alone, running the folder's code, samples the same images as route 1.
    from diffusers import DiffusionPipeline

    remote = DiffusionPipeline.from_pretrained(str(run.export_dir), trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    assert type(remote).__name__ == "FewStepDMDRPipeline" and remote.config.call_defaults == expected
    torch.testing.assert_close(student_images(remote), student_images(pipeline), rtol=0, atol=1e-6)


def test_a_corrupt_model_index_in_the_export_folder_is_an_error_not_an_empty_index(tmp_path):
    """Read as empty, its component folders would survive a re-export as stale files of the new export."""
    from diffusers_dmdr.export import export_entries

    (tmp_path / "model_index.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="model_index.json is not valid JSON"):
        export_entries(tmp_path)
