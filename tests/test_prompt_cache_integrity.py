# ruff: noqa: F401, F811  (pytest fixtures imported from test_preflight)
"""The prompt-embedding cache (issue 27.2): checked in the preflight (a folder that is a file or cannot be written:
one line before any weight loads) and validated on read (a truncated file, fewer rows than prompts, bad metadata,
NaN embeddings, a flipped block): each is reported once, naming the file, and rebuilt."""

import logging
import os
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config
from safetensors.torch import save_file
from test_preflight import config_for, prompts, weightless_teacher

from diffusers_dmdr.families import get_family
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.prompt_cache import PromptCacheError, PromptEncoder, read_cache, write_cache


PROMPTS = ["a red cube", "a blue sphere"]


@pytest.fixture(scope="module")
def sdxl_teacher(tiny_teacher_dirs):
    return get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"])


def build(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path):
    config = tiny_config(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path / "run",
        cache_prompt_embeds=True,
        prompt_embeds_cache_dir=str(tmp_path / "cache"),
    )
    return PromptEncoder.from_config(config, sdxl_teacher, Accelerator(cpu=True), PROMPTS)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    prompts, flat = read_cache(path)
    change(path, prompts, flat)


def _fewer_rows(path, prompts, flat):
    write_cache(path, prompts, {name: value[:-1] for name, value in flat.items()})


def _nan(path, prompts, flat):
    name = sorted(flat)[0]
    flat[name] = torch.full_like(flat[name], float("nan"))
    write_cache(path, prompts, flat)


def _bad_metadata(path, prompts, flat):
    save_file(flat, path, metadata={"prompts": "not json"})


def _missing_prompt(path, prompts, flat):
    write_cache(path, [p if p != PROMPTS[0] else "another prompt" for p in prompts], flat)


BREAKAGES = {
    "truncated": (_truncate, "does not parse"),
    "flipped_block": (_flip, "does not match the sha256"),
    "fewer_rows": (lambda path: _rewrite(path, _fewer_rows), "rows for"),
    "nan_embeddings": (lambda path: _rewrite(path, _nan), "NaN/inf embeddings"),
    "bad_metadata": (lambda path: _rewrite(path, _bad_metadata), "no readable prompt list"),
    "missing_prompt": (lambda path: _rewrite(path, _missing_prompt), "lacks 1 prompt(s) of this run"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_cache_is_reported_once_and_rebuilt(
    breakage, sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path, caplog
):
    first = build(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    expected = first.encode(PROMPTS)
    damage, reason = BREAKAGES[breakage]
    damage(path)
    with pytest.raises(PromptCacheError, match=re.escape(reason)):
        read_cache(path, PROMPTS)

    with caplog.at_level(logging.WARNING):
        again = build(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "prompt-embedding" in r.message]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0]
    # Rebuilt: the file reads back clean and serves the same conditioning, without a live encode.
    read_cache(path, PROMPTS)
    for key, value in again.encode(PROMPTS).items():
        torch.testing.assert_close(value, expected[key])
    assert again.live_encodes == 0


def test_a_good_cache_is_read_without_warning(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path, caplog):
    build(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    mtime = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        build(sdxl_teacher, tiny_teacher_dirs, prompt_file, tmp_path)
    assert "prompt-embedding" not in caplog.text and path.stat().st_mtime_ns == mtime
    cached_prompts, _ = read_cache(path, PROMPTS)
    assert set(PROMPTS) <= set(cached_prompts)


def test_preflight_refuses_a_cache_folder_that_is_a_file(weightless_teacher, prompts, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    config = config_for(
        weightless_teacher, prompts, cache_prompt_embeds=True, prompt_embeds_cache_dir=str(not_a_folder)
    )
    with pytest.raises(ValueError, match=f"--prompt_embeds_cache_dir {not_a_folder} is a file"):
        check_run_inputs(config)
    below_a_file = not_a_folder / "sub"
    config = config_for(
        weightless_teacher, prompts, cache_prompt_embeds=True, prompt_embeds_cache_dir=str(below_a_file)
    )
    with pytest.raises(ValueError, match="is a file, so the folder cannot be created"):
        check_run_inputs(config)


def test_preflight_refuses_a_read_only_cache_folder(weightless_teacher, prompts, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        # root writes through permission bits; simulate the refusal the probe would get as a user.
        import tempfile

        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if Path(dir) == folder:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    config = config_for(weightless_teacher, prompts, cache_prompt_embeds=True, prompt_embeds_cache_dir=str(folder))
    try:
        with pytest.raises(ValueError, match=f"--prompt_embeds_cache_dir {folder}: {folder} is not writable"):
            check_run_inputs(config)
    finally:
        folder.chmod(0o755)
