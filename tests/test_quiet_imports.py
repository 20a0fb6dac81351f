"""No Hub request from a run whose user did not ask for the Hub, with `HF_HUB_OFFLINE` unset.

bitsandbytes, imported by peft and diffusers, asks the Hub for a CPU kernel when the `kernels` package is installed
(transformers >= 5.25 depends on it) and the CPU has AVX512-BF16; `diffusers_dmdr.quiet_imports` imports it with the
Hub switched off. These tests run real processes against the stdlib fake Hub of `hub_server.py` and count requests.
"""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub


ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).parent
KERNELS_INSTALLED = importlib.util.find_spec("kernels") is not None


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def online_env(hub: FakeHub, tmp_path: Path, **extra: str) -> dict:
    """The environment of a user who never set the offline switches, with the Hub at the fake one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env


IMPORTS = "import diffusers_dmdr, peft; from diffusers import UNet2DConditionModel; print('imported')"


@pytest.mark.skipif(not KERNELS_INSTALLED, reason="`kernels` is not installed: bitsandbytes then asks the Hub nothing")
def test_the_libraries_still_read_the_switch_this_project_sets():
    """Fails loudly if kernels stops reading huggingface_hub's offline constant when it resolves a kernel, or
    bitsandbytes moves the lines `quiet_imports` drops: the guard would then silently stop working."""
    import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
    import kernels._internals.hf_hub as kernels_hf_hub
    import kernels._internals.load as kernels_load

    from diffusers_dmdr.quiet_imports import NOTICES

    assert "local_files_only=constants.HF_HUB_OFFLINE" in inspect.getsource(kernels_load)
    sources = {
        bnb_cpu_ops.__name__: inspect.getsource(bnb_cpu_ops),
        kernels_hf_hub.__name__: inspect.getsource(kernels_hf_hub),
    }
    for logger_name, prefix in NOTICES:
        assert logger_name in sources, logger_name
        assert prefix in sources[logger_name], (logger_name, prefix)


@pytest.mark.skipif(
    not (KERNELS_INSTALLED and cpu_has_avx512_bf16()),
    reason="bitsandbytes asks for its CPU kernel only with `kernels` installed and an AVX512-BF16 CPU",
)
def test_without_the_guard_the_import_reaches_the_hub(tmp_path):
    """Negative control: the fake Hub does see bitsandbytes' request when the user lets it through."""
    with FakeHub() as hub:
        env = online_env(hub, tmp_path, DMDR_ALLOW_KERNEL_DOWNLOADS="1")
        result = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.requests, "bitsandbytes no longer asks the Hub: quiet_imports may be unnecessary"


def test_importing_the_package_and_its_libraries_asks_the_hub_nothing(tmp_path):
    with FakeHub() as hub:
        result = subprocess.run(
            [sys.executable, "-c", IMPORTS], env=online_env(hub, tmp_path), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.requests == []
    assert "imported" in result.stdout
    assert "kernels-community" not in result.stderr and "gemm_4bit_forward" not in result.stderr, result.stderr


def test_a_local_training_run_and_export_ask_the_hub_nothing(tiny_teacher_dirs, prompt_file, tmp_path):
    """`accelerate launch train.py` on a local teacher with 8-bit AdamW (bitsandbytes in use) and its end-of-run export,
    then `dmdr-export` of the checkpoint: zero requests, and none of bitsandbytes' kernel lines in the output."""
    from test_train_script import ACCELERATE, SCRIPT, tiny_args

    run_dir = tmp_path / "run"
    args = tiny_args(tiny_teacher_dirs["sdxl"], prompt_file, run_dir, steps=2) + ["--use_8bit_adam"]
    with FakeHub() as hub:
        env = online_env(hub, tmp_path)
        train = subprocess.run(
            ACCELERATE + ["--num_processes", "1", "--cpu", str(SCRIPT)] + args,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert train.returncode == 0, train.stderr[-5000:]
        export = subprocess.run(
            [
                sys.executable,
                "-m",
                "diffusers_dmdr.export_cli",
                "--checkpoint",
                str(run_dir),
                "--output_dir",
                str(tmp_path / "export"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert export.returncode == 0, export.stderr[-5000:]
        assert hub.requests == []
    assert (tmp_path / "export" / "model_index.json").is_file()
    output = train.stdout + train.stderr + export.stdout + export.stderr
    assert "kernels-community" not in output and "gemm_4bit_forward" not in output
