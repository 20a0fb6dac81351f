"""The Hub cannot hang or break an export: a fake Hub on 127.0.0.1 that hangs, returns 500 or closes the
connection; the export folder and its card are written first, the push fails within its timeout naming the retry
command, and a local export sends no request at all."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import tiny_config


TESTS_DIR = Path(__file__).parent

# Runs in a fresh Python: huggingface_hub reads HF_ENDPOINT at import, so the fake Hub starts first.
EXPORT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from hub_server import FakeHub

    run_dir, export_dir = sys.argv[1], sys.argv[2]
    hub = FakeHub().__enter__()
    os.environ["HF_ENDPOINT"] = hub.endpoint
    from diffusers_dmdr.export import HubUploadError, push_to_hub
    from diffusers_dmdr.export_cli import main

    results = {}
    main(["--checkpoint", run_dir, "--output_dir", export_dir + "/local"])
    results["local_requests"] = list(hub.requests)
    for mode in ("hang", "error500", "close"):
        hub.mode, hub.requests[:] = mode, []
        folder = f"{export_dir}/{mode}"
        start = time.monotonic()
        if mode == "hang":  # the whole export command: the folder and its card are written before the push
            try:
                main(["--checkpoint", run_dir, "--output_dir", folder, "--push_to_hub", "--hub_model_id",
                      "org/student", "--hub_timeout", "2"])
                results[mode] = {"error": None}
            except SystemExit as exit:
                results[mode] = {"exit": exit.code}
        else:  # the push alone, of the local export
            folder = export_dir + "/local"
            try:
                push_to_hub(folder, "org/student", checkpoint=run_dir, timeout=2)
                results[mode] = {"error": None}
            except HubUploadError as error:
                print(error, file=sys.stderr)
                results[mode] = {"exit": 1}
        results[mode].update(seconds=time.monotonic() - start, requests=len(hub.requests),
                             readme=os.path.isfile(f"{folder}/README.md"))
    print("RESULTS" + json.dumps(results))
    hub.__exit__(None, None, None)
    """
)


def test_export_survives_a_broken_hub_and_a_local_export_sends_nothing(tiny_teacher_dirs, prompt_file, tmp_path):
    """One fresh Python (~30 s on a busy 2-core machine: imports, two exports, three 2 s deadlines) for all four
    scenarios, since huggingface_hub reads HF_ENDPOINT at import."""
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer

    run_dir = tmp_path / "run"
    config = tiny_config(
        tiny_teacher_dirs["sdxl"], prompt_file, run_dir, export_full_pipeline=False, hub_model_id="org/student"
    )
    DMDRTrainer(
        config, get_family("sdxl").load_teacher(config.pretrained_model_name_or_path), ["a cat"]
    ).save_checkpoint()

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", HF_TOKEN="hf_dmdrTestToken0123456789")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(run_dir), str(tmp_path / "exports")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(result.stdout.split("RESULTS", 1)[1].splitlines()[0])

    # A local export (a local teacher, no --push_to_hub) asks the Hub nothing, not even for its folder's name.
    assert results["local_requests"] == []
    local = tmp_path / "exports" / "local"
    # What is published names no local folder (the teacher, prompts and run live under tmp_path): the exported
    # recipe never does, the card does not once the export is pushed (a local card's snippets keep working here).
    assert "<local>/" in (local / "dmdr_config.yaml").read_text(encoding="utf-8")
    assert str(tmp_path) not in (local / "dmdr_config.yaml").read_text(encoding="utf-8")
    assert str(tmp_path) not in (tmp_path / "exports" / "hang" / "README.md").read_text(encoding="utf-8")
    for mode in ("hang", "error500", "close"):
        outcome = results[mode]
        assert outcome["exit"] == 1 and outcome["readme"], (mode, outcome)
        assert outcome["requests"] >= 1, mode  # the push really reached the broken Hub
        # Without the deadline: "hang" blocks forever, "error500" retries with back-off for ~23 s per call.
        assert outcome["seconds"] < 20, (mode, outcome)
    stderr = result.stderr
    assert stderr.count("The export folder is intact. Retry with:") == 3
    hang_dir, checkpoint = tmp_path / "exports" / "hang", run_dir / "checkpoint-0"
    assert f"dmdr-export --checkpoint {checkpoint} --output_dir {hang_dir} --push_to_hub" in stderr
    assert "did not finish within 2 s (--hub_timeout)" in stderr
    assert "hf_dmdrTestToken0123456789" not in result.stdout + stderr


def test_the_teachers_card_is_read_at_its_pinned_revision(tmp_path, monkeypatch):
    """A pinned teacher's licence comes from its card at that revision, not from `main`."""
    import huggingface_hub

    from diffusers_dmdr.hub import remote_model_card_data

    downloads = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        downloads.append((repo_id, filename, revision))
        card = tmp_path / f"{revision}.md"
        card.write_text(f"---\nlicense: {'openrail++' if revision == 'v1.0' else 'other'}\n---\n# teacher\n")
        return str(card)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert remote_model_card_data("org/teacher", "v1.0", timeout=20).get("license") == "openrail++"
    assert downloads == [("org/teacher", "README.md", "v1.0")]
