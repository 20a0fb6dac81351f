"""Shared fixtures: tiny real diffusers teachers built in code, offline."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# The test models are tiny: a second thread buys nothing and, on a busy 2-core machine, oversubscription made runs
# several times slower.
torch.set_num_threads(1)


def _tiny_digits_settings():
    from diffusers_dmdr.digits import DigitsBuildSettings

    # Every budget cut to a couple of steps: the build's code paths, not its quality.
    return DigitsBuildSettings(
        vae_steps=2,
        unet_steps=2,
        reward_steps=2,
        eval_steps=2,
        latent_pool_size=32,
        gate_num_per_pair=1,
        gate_num_inference_steps=2,
        real_num_per_pair=4,
    )


# The digits testbed's tiny build, shared by the digits tests (the same settings give the same cache key).
TINY_DIGITS_SETTINGS = _tiny_digits_settings()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_teacher_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny teacher pipelines, one folder per family (built once per session)."""
    from diffusers_dmdr.testing import build_tiny_pipeline

    root = tmp_path_factory.mktemp("teachers")
    families = ("sdxl", "sd15", "sd3", "flux", "flux2", "zimage", "qwenimage")
    return {family: str(build_tiny_pipeline(family, root / family)) for family in families}


@pytest.fixture(scope="session")
def wan_dirs(tmp_path_factory) -> dict[str, str]:
    """Saved tiny Wan teachers (video; built only by the Wan tests): Wan 2.1 T2V's layout and Wan 2.2 TI2V-5B's."""
    from diffusers_dmdr.testing import build_tiny_pipeline

    root = tmp_path_factory.mktemp("wan")
    return {
        variant: str(build_tiny_pipeline("wan", root / variant, variant=variant)) for variant in ("2.1", "2.2-ti2v")
    }


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog\nthe number seven\n\na green house\n", encoding="utf-8")
    return str(path)


def tiny_config(teacher_dir: str, prompts: str, output_dir, **overrides):
    """A DMDRConfig sized for the tiny teachers: 64 px, rank-4 adapters, fast learning rates, no trackers."""
    from diffusers_dmdr import DMDRConfig

    values = dict(
        pretrained_model_name_or_path=teacher_dir,
        train_prompts=prompts,
        output_dir=str(output_dir),
        resolution=64,
        max_train_steps=2,
        cold_start_steps=1,
        dynamic_steps=2,
        update_ratio=2,
        train_batch_size=2,
        lora_rank=4,
        lora_alpha=4,
        fake_lora_rank=4,
        fake_lora_alpha=4,
        learning_rate=1e-3,
        learning_rate_fake=1e-3,
        report_to="none",
        checkpointing_steps=1000,
    )
    values.update(overrides)
    return DMDRConfig(**values)
