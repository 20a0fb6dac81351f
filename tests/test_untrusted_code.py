"""No module a teacher folder names is imported before (or instead of) diffusers' own loading rules (issue 27.1).

A downloaded folder can hold a `model_index.json` naming its own Python module for a component; run from inside that
folder (`python -m diffusers_dmdr.train --pretrained_model_name_or_path .`), the folder is on `sys.path`, so importing
the named module would run the file. The preflight's memory plan must refuse it without importing it.
"""

import json
import sys

import pytest
from test_preflight import config_for

from diffusers_dmdr.memory_plan import meta_model
from diffusers_dmdr.preflight import check_run_inputs


PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("ran")

class EvilUNet:
    @classmethod
    def from_config(cls, config):
        return cls()
"""


@pytest.fixture
def planted_teacher(tmp_path, monkeypatch):
    folder = tmp_path / "downloaded"
    for name, config in (("unet", {"in_channels": 4}), ("vae", {"block_out_channels": [8, 8, 8, 8]})):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["evil_unet_mod", "EvilUNet"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    marker = tmp_path / "marker.txt"
    (folder / "evil_unet_mod.py").write_text(PLANTED.format(marker=str(marker)))
    # As `python -m ... --pretrained_model_name_or_path .` run from inside the folder: it is on sys.path.
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder, marker
    sys.modules.pop("evil_unet_mod", None)


def test_preflight_never_imports_a_module_the_teacher_names(planted_teacher, tmp_path):
    folder, marker = planted_teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match="only diffusers and transformers classes are loaded") as error:
        check_run_inputs(config_for(".", prompts, output_dir=str(tmp_path / "out")))
    assert "'evil_unet_mod'" in str(error.value)
    assert not marker.exists(), "the planted module ran"
    assert "evil_unet_mod" not in sys.modules


def test_meta_model_takes_only_diffusers_and_transformers_classes(planted_teacher):
    _, marker = planted_teacher
    with pytest.raises(ValueError, match="never imported"):
        meta_model("evil_unet_mod", "EvilUNet", {})
    # A name of the allowed libraries that is not a model class (a function) is refused too.
    with pytest.raises(ValueError, match="has no model class 'make_image_grid'"):
        meta_model("diffusers", "make_image_grid", {})
    assert not marker.exists()
