# ruff: noqa: F401, F811  (pytest fixtures imported from test_preflight)
"""Local teacher paths stay resolvable (issue 27.5): a relative `--pretrained_model_name_or_path` is recorded as an
absolute folder in the run's recipe (so `dmdr-export` of a checkpoint works from any folder), and an export keeps
this machine's teacher folder in a file that is never published, so `evaluate --teacher auto` finds it while the
published recipe still names it `<local>/<name>`."""

import yaml
from test_preflight import config_for, prompts, weightless_teacher

from diffusers_dmdr.evaluate import export_teacher
from diffusers_dmdr.export import write_local_paths
from diffusers_dmdr.export_layout import LOCAL_PATHS_FILE
from diffusers_dmdr.hub import UPLOAD_IGNORE_PATTERNS
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.utils import redact_local_paths_in


def test_a_relative_teacher_is_recorded_absolute(weightless_teacher, prompts, tmp_path, monkeypatch):
    monkeypatch.chdir(weightless_teacher.parent)
    config = config_for(weightless_teacher.name, prompts, output_dir=str(tmp_path / "run"))
    assert config.pretrained_model_name_or_path == "teacher"
    check_run_inputs(config)
    assert config.pretrained_model_name_or_path == str(weightless_teacher.resolve())
    # What train.py writes into the run folder and every checkpoint.
    config.save_yaml(tmp_path / "dmdr_config.yaml")
    recorded = yaml.safe_load((tmp_path / "dmdr_config.yaml").read_text())["pretrained_model_name_or_path"]
    assert recorded == str(weightless_teacher.resolve())


def test_no_local_paths_file_for_a_hub_teacher(weightless_teacher, prompts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_for("org/not-a-local-folder", prompts)
    write_local_paths(tmp_path, config)
    assert not (tmp_path / LOCAL_PATHS_FILE).exists()


def test_evaluate_teacher_auto_finds_a_local_teacher_from_another_folder(
    weightless_teacher,
    prompts,
    tmp_path,
    monkeypatch,
):
    export = tmp_path / "export"
    export.mkdir()
    monkeypatch.chdir(weightless_teacher.parent)
    config = config_for("teacher", prompts)
    # The published recipe: the teacher redacted, as `assemble_export` writes it.
    public = redact_local_paths_in({"pretrained_model_name_or_path": str(weightless_teacher.resolve())})
    (export / "dmdr_config.yaml").write_text(yaml.safe_dump(public))
    assert public["pretrained_model_name_or_path"].startswith("<local>/")
    write_local_paths(export, config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert export_teacher(str(export)) == str(weightless_teacher.resolve())
    # Never published by the project's own push.
    assert LOCAL_PATHS_FILE in UPLOAD_IGNORE_PATTERNS
