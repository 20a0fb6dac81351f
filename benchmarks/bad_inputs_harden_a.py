"""Try the bad inputs of issue 27 items 1-6 and 9 and count how each ends: clear before any weight loads (one line,
exit 2, or one warning and a safe fallback), clear after the teacher loads, a traceback, or silently accepted.

    python benchmarks/bad_inputs_harden_a.py [--output results.json]

Offline and CPU-only (~1 min: it builds a tiny SDXL teacher for the prompt-cache cases). Not part of `make test`; the
behaviour of each case is asserted by the tests named in its row.
"""

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


BEFORE, AFTER, TRACEBACK, SILENT = "clear before load", "clear after load", "traceback", "silently accepted"


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_warnings():
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def weightless_teacher(root: Path, index_extra: dict | None = None) -> Path:
    folder = root / "teacher"
    for name, config in (("unet", {"in_channels": 4}), ("vae", {"block_out_channels": [8, 8, 8, 8]})):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    index = {"_class_name": "StableDiffusionXLPipeline", **(index_extra or {})}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def base_argv(teacher: Path, prompts: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(teacher), "--train_prompts", str(prompts), "--resolution", "64",
        "--max_train_steps", "4", "--report_to", "none", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def preflight_outcome(argv: list[str], expect_warning: str | None = None) -> tuple[str, str]:
    """Run the training program's parse-and-check (everything before the teacher loads)."""
    from diffusers_dmdr.train import parse_and_check

    stderr = io.StringIO()
    with captured_warnings() as warnings, contextlib.redirect_stderr(stderr):
        try:
            parse_and_check(argv)
        except SystemExit as exit_info:
            # Progress bars (`datasets` reading the prompt file) share stderr: the message starts at "train.py:".
            text = stderr.getvalue()
            start = max(text.find("train.py:"), text.find("dmdr-train:"))
            text = text[start:].strip() if start >= 0 else text.strip()
            one_line = exit_info.code in (1, 2) and len(text.splitlines()) == 1
            return (BEFORE if one_line else TRACEBACK), text
        except Exception as error:  # noqa: BLE001 (a traceback is what this harness counts)
            return TRACEBACK, f"{type(error).__name__}: {error}"
    hits = [message for message in warnings if expect_warning and expect_warning in message]
    return (BEFORE, hits[0]) if hits else (SILENT, "; ".join(warnings))


def write_checkpoint(config, step=2, family="sdxl", grid=(999.0, 749.0, 499.0, 249.0), processes=1, value=0.0):
    from diffusers_dmdr.checkpointing import CONFIG_FILE, atomic_checkpoint_save, save_trainer_state

    def write(folder):
        save_file({"w": torch.full((4096,), value)}, folder / "student_lora.safetensors")
        save_file({"w": torch.full((16,), value)}, folder / "fake_lora.safetensors")

    def finalize(folder):
        config.save_yaml(folder / CONFIG_FILE)
        run = {"family": family, "student_timesteps": list(grid), "num_processes": processes}
        try:
            save_trainer_state(folder, {"global_step": step, "iteration": step}, [], run)
        except TypeError:  # the code before issue 27 records no run facts (to measure it with --before figures)
            save_trainer_state(folder, {"global_step": step, "iteration": step}, [])

    return atomic_checkpoint_save(config.output_dir, step, write, finalize)


def resume_cases(root: Path, teacher: Path, prompts: Path):
    from diffusers_dmdr import DMDRConfig

    def config(output_dir, **overrides):
        values = dict(pretrained_model_name_or_path=str(teacher), train_prompts=str(prompts), resolution=64,
                      max_train_steps=4, report_to="none", output_dir=str(output_dir))  # fmt: skip
        return DMDRConfig(**{**values, **overrides})

    cases = []
    structural = [
        ("lora_rank", {}, ["--lora_rank", "8"]),
        ("lora_alpha", {}, ["--lora_alpha", "3"]),
        ("training_mode", {}, ["--training_mode", "full"]),
        ("lora_target_modules", {}, ["--lora_target_modules", "to_q,to_k"]),
        ("fake_lora_rank", {}, ["--fake_lora_rank", "8"]),
        ("num_student_steps", {}, ["--num_student_steps", "2"]),
        ("family", {"family": "sd3"}, []),
        ("student grid", {"grid": (999.0, 800.0, 500.0, 200.0)}, []),
    ]
    for index, (name, facts, flags) in enumerate(structural):
        run_dir = root / f"resume-structural-{index}"
        write_checkpoint(config(run_dir), **facts)
        argv = base_argv(teacher, prompts, run_dir, "--resume_from_checkpoint", "latest", *flags)
        cases.append((f"4 resume, changed {name}", "test_resume_recipe", *preflight_outcome(argv)))
    warned = [
        ("train_batch_size", {}, ["--train_batch_size", "2"]),
        ("gradient_accumulation_steps", {}, ["--gradient_accumulation_steps", "2"]),
        ("process count", {"processes": 2}, []),
        ("lr schedule", {}, ["--lr_scheduler", "cosine"]),
    ]
    for index, (name, facts, flags) in enumerate(warned):
        run_dir = root / f"resume-warned-{index}"
        write_checkpoint(config(run_dir), **facts)
        argv = base_argv(teacher, prompts, run_dir, "--resume_from_checkpoint", "latest", *flags)
        cases.append((f"4 resume, changed {name}", "test_resume_recipe", *preflight_outcome(argv, "changed recipe")))
    # A longer run: the derived stage boundary of the run under way must stay (silently moved before).
    run_dir = root / "resume-longer"
    write_checkpoint(config(run_dir), step=1)
    from diffusers_dmdr.train import parse_and_check

    longer, _ = parse_and_check(
        base_argv(teacher, prompts, run_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "10")
    )
    kept = longer.cold_start_steps == 2
    cases.append(("4 resume, larger --max_train_steps", "test_resume_recipe", BEFORE if kept else SILENT,
                  f"cold_start_steps {longer.cold_start_steps} (run under way: 2)"))  # fmt: skip
    return cases


def checkpoint_cases(root: Path, teacher: Path, prompts: Path):
    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.checkpointing import CheckpointError, atomic_checkpoint_save

    def config(output_dir):
        return DMDRConfig(pretrained_model_name_or_path=str(teacher), train_prompts=str(prompts), resolution=64,
                          max_train_steps=4, report_to="none", output_dir=str(output_dir))  # fmt: skip

    cases = []

    def flip(folder):
        lora = folder / "student_lora.safetensors"
        data = bytearray(lora.read_bytes())
        data[-4196:-100] = bytes(b ^ 0xFF for b in data[-4196:-100])
        lora.write_bytes(bytes(data))

    def bad_header(folder):
        # Written corrupt before the marker: the hashes match, the header does not parse.
        from diffusers_dmdr import checkpointing

        (folder / "student_lora.safetensors").write_bytes(b"\xff" * 64)
        checkpointing.write_complete_marker(folder, 3)

    for name, damage, value in (("4 KiB flipped in the LoRA", flip, 0.0), ("corrupt header", bad_header, 0.0),
                                ("NaN weights", None, float("nan"))):  # fmt: skip
        for mode in ("latest", "explicit"):
            run_dir = root / f"ckpt-{len(cases)}"
            write_checkpoint(config(run_dir), step=2)
            newest = write_checkpoint(config(run_dir), step=3, value=value)
            if damage is not None:
                damage(newest)
            target = "latest" if mode == "latest" else str(newest)
            argv = base_argv(teacher, prompts, run_dir, "--resume_from_checkpoint", target)
            outcome = preflight_outcome(argv, "Skipping checkpoint")
            cases.append((f"3 resume {mode}, {name}", "test_checkpoint_integrity", *outcome))

    for name, error in (("OSError ENOSPC", OSError(errno.ENOSPC, "No space left on device")),
                        ("torch writer 'unexpected pos'", RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                                        "unexpected pos 4416 vs 4310"))):  # fmt: skip
        run_dir = root / f"disk-{len(cases)}"
        atomic_checkpoint_save(run_dir, 1, lambda folder: (folder / "a").write_bytes(b"a"), limit=2)

        def full(folder, error=error):
            raise error

        try:
            atomic_checkpoint_save(run_dir, 2, full, limit=2)
            cases.append((f"3 disk full ({name})", "test_checkpoint_integrity", SILENT, ""))
        except CheckpointError as raised:
            kept = (run_dir / "checkpoint-1").is_dir()
            ok = "No space left on" in str(raised) and kept and "\n" not in str(raised)
            cases.append(
                (f"3 disk full ({name})", "test_checkpoint_integrity", AFTER if ok else TRACEBACK, str(raised))
            )
        except Exception as raised:  # noqa: BLE001
            cases.append((f"3 disk full ({name})", "test_checkpoint_integrity", TRACEBACK, repr(raised)))
    return cases


def cache_cases(root: Path, prompts: Path):
    from accelerate import Accelerator

    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.prompt_cache import PromptEncoder, flatten_condition, read_cache, write_cache
    from diffusers_dmdr.testing import build_tiny_pipeline

    teacher_dir = build_tiny_pipeline("sdxl", root / "tiny-sdxl")
    teacher = get_family("sdxl").load_teacher(str(teacher_dir))
    cache_dir = root / "cache"
    config = DMDRConfig(pretrained_model_name_or_path=str(teacher_dir), train_prompts=str(prompts), resolution=64,
                        max_train_steps=2, report_to="none", lora_rank=4, fake_lora_rank=4, cache_prompt_embeds=True,
                        prompt_embeds_cache_dir=str(cache_dir), output_dir=str(root / "cache-run"))  # fmt: skip
    wanted = ["a red cat", "a blue dog"]

    def build():
        return PromptEncoder.from_config(config, teacher, Accelerator(cpu=True), wanted)

    build()
    (path,) = cache_dir.glob("*.safetensors")

    def rewrite(change):
        prompts_, flat = read_cache(path)
        change(prompts_, flat)

    def nan(prompts_, flat):
        name = sorted(flat)[0]
        flat[name] = torch.full_like(flat[name], float("nan"))
        write_cache(path, prompts_, flat)

    damages = {
        "truncated file": lambda: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
        "fewer rows than prompts": lambda: rewrite(
            lambda p, f: write_cache(path, p, {k: v[:-1] for k, v in f.items()})
        ),
        "bad metadata": lambda: rewrite(lambda p, f: save_file(f, path, metadata={"prompts": "{"})),
        "NaN embeddings": lambda: rewrite(nan),
        "flipped bytes": lambda: path.write_bytes(path.read_bytes()[:-64] + bytes(64)),
    }
    cases = []
    for name, damage in damages.items():
        path.unlink(missing_ok=True)
        build()  # a sound file to damage
        damage()
        with captured_warnings() as warnings:
            try:
                encoder = build()
                condition = flatten_condition(encoder.encode(wanted))
                finite = all(bool(torch.isfinite(v).all()) for v in condition.values() if v.is_floating_point())
                hits = [w for w in warnings if str(path) in w]
                outcome = (AFTER, hits[0]) if hits and finite and len(hits) == 1 else (SILENT, "; ".join(warnings))
            except Exception as error:  # noqa: BLE001
                outcome = (TRACEBACK, f"{type(error).__name__}: {error}")
        cases.append((f"2 prompt cache: {name}", "test_prompt_cache_integrity", *outcome))
    return cases


def diffusers_flag_cases(root: Path, prompts: Path):
    """Item 9: bad values of the diffusers-script flags (`--pretrained_vae_model_name_or_path`, `--lora_dropout`,
    `--cache_dir`, `--dataloader_num_workers`) and rewards that are not available offline."""
    teacher = weightless_teacher(root / "vae-teacher")
    teacher_vae = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8, 8, 8], "latent_channels": 4,
                   "scaling_factor": 0.13025}  # fmt: skip
    (teacher / "vae" / "config.json").write_text(json.dumps(teacher_vae))

    def vae_folder(name, weights="diffusion_pytorch_model.safetensors", **changes):
        folder = root / "vaes" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**teacher_vae, **changes}))
        if weights:
            (folder / weights).write_bytes(b"")
        return folder

    as_file = root / "a-file"
    as_file.write_text("x")
    no_tokenizer = root / "pickscore-weights-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    vae_flag = "--pretrained_vae_model_name_or_path"
    flags = [
        ("VAE folder missing", [vae_flag, str(root / "missing")]),
        ("VAE is a pipeline folder", [vae_flag, str(teacher)]),
        ("VAE with 16 latent channels", [vae_flag, str(vae_folder("c16", latent_channels=16))]),
        ("VAE with another scaling factor", [vae_flag, str(vae_folder("sf", scaling_factor=0.18215))]),
        ("VAE with another spatial factor", [vae_flag, str(vae_folder("deep", block_out_channels=[8, 8, 8]))]),
        ("VAE of another class", [vae_flag, str(vae_folder("tiny", _class_name="AutoencoderTiny"))]),
        ("VAE without --variant fp16 files", [vae_flag, str(vae_folder("plain")), "--variant", "fp16"]),
        ("VAE folder without safetensors", [vae_flag, str(vae_folder("bin", weights="diffusion_pytorch_model.bin"))]),
        ("Hub VAE not in the offline cache", [vae_flag, "madebyollin/sdxl-vae-fp16-fix"]),
        ("--lora_dropout 1", ["--lora_dropout", "1"]),
        ("--lora_dropout -0.1", ["--lora_dropout", "-0.1"]),
        ("--lora_dropout nan", ["--lora_dropout", "nan"]),
        ("--lora_dropout 0.1 with --training_mode full", ["--lora_dropout", "0.1", "--training_mode", "full"]),
        ("--cache_dir is a file", ["--cache_dir", str(as_file)]),
        ("--dataloader_num_workers 4", ["--dataloader_num_workers", "4"]),
        ("offline: pickscore (defaults not cached)", ["--reward", "pickscore"]),
        ("offline: aesthetic (defaults not cached)", ["--reward", "aesthetic"]),
        ("offline: clip:model=<Hub id not cached>", ["--reward", "clip:model=dmdr-tests/not-cached"]),
        ("offline: pickscore local folder, no tokenizer", ["--reward", f"pickscore:model={no_tokenizer}"]),
    ]
    return [
        (f"9 {name}", "test_diffusers_flags", *preflight_outcome(base_argv(teacher, prompts, root / "run9", *extra)))
        for name, extra in flags
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="write the rows and totals as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Warnings reach the capturing handler only (no console handler): the harness counts them.
    logging.getLogger().setLevel(logging.WARNING)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = root / "prompts.txt"
        prompts.write_text("a red cat\na blue dog\n")

        # 1. A planted module named by the teacher's model_index.json, run from inside the folder.
        planted = weightless_teacher(root / "planted", {"unet": ["evil_unet_mod", "EvilUNet"]})
        marker = root / "marker.txt"
        (planted / "evil_unet_mod.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        )
        cwd = os.getcwd()
        os.chdir(planted)
        sys.path.insert(0, str(planted))
        try:
            outcome = preflight_outcome(base_argv(Path("."), prompts, root / "planted-run"))
        finally:
            os.chdir(cwd)
            sys.path.remove(str(planted))
        if marker.exists():
            outcome = (SILENT, "the planted module ran")
        cases.append(("1 teacher names a planted module", "test_untrusted_code", *outcome))

        teacher = weightless_teacher(root / "plain")
        # 2. The cache folder, checked before any weight loads.
        as_file = root / "cache-file"
        as_file.write_text("x")
        for name, folder in (("folder is a file", as_file), ("folder below a file", as_file / "sub")):
            argv = base_argv(teacher, prompts, root / "run", "--cache_prompt_embeds", "true",
                             "--prompt_embeds_cache_dir", str(folder))  # fmt: skip
            cases.append((f"2 prompt cache: {name}", "test_prompt_cache_integrity", *preflight_outcome(argv)))
        if os.geteuid() != 0:
            read_only = root / "cache-ro"
            read_only.mkdir()
            read_only.chmod(0o555)
            argv = base_argv(teacher, prompts, root / "run", "--cache_prompt_embeds", "true",
                             "--prompt_embeds_cache_dir", str(read_only))  # fmt: skip
            cases.append(("2 prompt cache: read-only folder", "test_prompt_cache_integrity", *preflight_outcome(argv)))
            read_only.chmod(0o755)
        cases += resume_cases(root, teacher, prompts)
        cases += checkpoint_cases(root, teacher, prompts)

        # 6. A custom reward scoring above 0.7 with no hinge given.
        from diffusers_dmdr.rewards import load_rewards

        module = root / "bright_reward.py"
        module.write_text("import torch\ndef bright(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
        sys.path.insert(0, str(root))
        with captured_warnings() as warnings:
            (reward,) = load_rewards(["bright_reward.bright"], "cpu")
        sys.path.remove(str(root))
        linear = reward.hinge is None and sum("default_hinge" in w for w in warnings) == 1
        cases.append(("6 custom reward, no hinge given", "test_custom_reward_hinge", BEFORE if linear else SILENT,
                      f"hinge {reward.hinge}"))  # fmt: skip

        cases += diffusers_flag_cases(root, prompts)
        cases += cache_cases(root, prompts)

    totals = {kind: sum(row[2] == kind for row in cases) for kind in (BEFORE, AFTER, TRACEBACK, SILENT)}
    for name, test, outcome, detail in cases:
        print(f"{outcome:<18} {name:<48} [{test}] {detail[:150]}")  # noqa: T201
    print(f"\n{len(cases)} bad inputs tried / " + " / ".join(f"{n} {k}" for k, n in totals.items()))  # noqa: T201
    if args.output:
        rows = [dict(zip(("input", "test", "outcome", "detail"), row, strict=True)) for row in cases]
        Path(args.output).write_text(json.dumps({"rows": rows, "tried": len(cases), **totals}, indent=1))
    return 0 if totals[TRACEBACK] == totals[SILENT] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
