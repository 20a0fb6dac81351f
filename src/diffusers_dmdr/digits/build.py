"""Build, cache and load the digits testbed: teacher pipeline, reward classifier, evaluation classifier, prompts.

Command line (prints the paths, the timings and the teacher's quality gate):

```
python -m diffusers_dmdr.digits [--cache_dir DIR] [--force] [--num_threads 2]
```

The artefacts go to `<cache_dir>/<DIGITS_TESTBED_VERSION>-<hash of the build settings>/`:

```
teacher/                          a StableDiffusionXLPipeline folder (DiffusionPipeline.from_pretrained loads it)
reward_classifier.safetensors     RewardDigitNet weights, for DigitClassifierReward(model=...)
eval_classifier.safetensors       EvalDigitNet weights, for load_eval_classifier(...)
prompts.txt                       the 40 training prompts, one per line, for --train_prompts
build.json                        settings, timings, split sizes, classifier accuracies, the teacher gate metrics
```

A folder with a `build.json` is reused as is; a build writes to a temporary folder that is renamed at the end, so an
interrupted build never leaves a half-written cache behind.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .classifiers import EvalDigitNet, RewardDigitNet, predict_digits, train_classifier
from .data import DIGITS_RESOLUTION, NUM_DIGITS, digit_prompt, load_digit_splits, write_prompts_file
from .metrics import evaluate_digits
from .sampling import sample_digits
from .teacher import (
    assemble_teacher,
    digits_text_components,
    digits_unet,
    digits_vae,
    encode_latents,
    train_unet,
    train_vae,
)


logger = logging.getLogger(__name__)

# Bump when the data, an architecture or a training recipe changes: it invalidates every cached build.
DIGITS_TESTBED_VERSION = "digits-v1"
# Environment variable that moves the default cache (`~/.cache/diffusers_dmdr/digits`).
CACHE_ENV_VARIABLE = "DIFFUSERS_DMDR_CACHE"
# The teacher's sampling setting for the quality gate and the teacher row of the demo's table.
TEACHER_NUM_INFERENCE_STEPS = 25
# CFG 3 is the best FD at full accuracy (docs/digits.md): 5 and 8 trade recall for nothing.
TEACHER_GUIDANCE_SCALE = 3.0
# The quality gate: the teacher's samples must reach this accuracy under the evaluation classifier.
TEACHER_GATE_ACCURACY = 0.9


@dataclass
class DigitsBuildSettings:
    """Training budgets of the testbed's models (defaults: about 4 minutes on 2 CPU cores).

    Args:
        vae_steps (`int`, *optional*, defaults to 300): autoencoder steps (batch 32).
        unet_steps (`int`, *optional*, defaults to 1000): teacher U-Net steps (batch 64).
        unet_block_out_channels (`tuple[int, int]`, *optional*, defaults to `(32, 64)`): U-Net widths.
        reward_steps (`int`, *optional*, defaults to 300): reward classifier steps (batch 64).
        eval_steps (`int`, *optional*, defaults to 300): evaluation classifier steps (batch 64).
        gate_num_per_digit (`int`, *optional*, defaults to 20): teacher samples per digit for the gate.
        gate_num_inference_steps (`int`, *optional*, defaults to 25): teacher steps for the gate.
        gate_guidance_scale (`float`, *optional*, defaults to 3.0): teacher CFG scale for the gate.
        seed (`int`, *optional*, defaults to 0): seeds every model and the data split.
    """

    vae_steps: int = 300
    unet_steps: int = 1000
    unet_block_out_channels: tuple[int, int] = (32, 64)
    reward_steps: int = 300
    eval_steps: int = 300
    gate_num_per_digit: int = 20
    gate_num_inference_steps: int = TEACHER_NUM_INFERENCE_STEPS
    gate_guidance_scale: float = TEACHER_GUIDANCE_SCALE
    seed: int = 0

    def cache_key(self) -> str:
        """`<version>-<first 10 hex digits of the settings' SHA-256>`."""
        settings = json.dumps(asdict(self), sort_keys=True)
        return f"{DIGITS_TESTBED_VERSION}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


@dataclass
class DigitsTestbed:
    """Paths of a built testbed and its `build.json` report.

    Args:
        root (`Path`): the cache folder of this build.
        report (`dict`): the content of `build.json`.
    """

    root: Path
    report: dict = field(default_factory=dict)

    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    @property
    def reward_weights(self) -> Path:
        return self.root / "reward_classifier.safetensors"

    @property
    def eval_weights(self) -> Path:
        return self.root / "eval_classifier.safetensors"

    @property
    def prompts_file(self) -> Path:
        return self.root / "prompts.txt"

    @property
    def gate_passed(self) -> bool:
        return self.report["teacher_gate"]["accuracy"] >= TEACHER_GATE_ACCURACY

    def reward_spec(self, weight: float = 1.0) -> str:
        """The trainer's `--reward` value for the digits reward, linear (a log-probability never reaches a hinge)."""
        return f"diffusers_dmdr.digits.reward.DigitClassifierReward:{weight}:hinge=none:model={self.reward_weights}"


def default_cache_dir() -> Path:
    """`$DIFFUSERS_DMDR_CACHE/digits`, or `~/.cache/diffusers_dmdr/digits`."""
    base = os.environ.get(CACHE_ENV_VARIABLE)
    return (Path(base) if base else Path.home() / ".cache" / "diffusers_dmdr") / "digits"


def load_eval_classifier(path: str | Path) -> EvalDigitNet:
    """An [`EvalDigitNet`] with weights from a `.safetensors` file, frozen, in eval mode."""
    from safetensors.torch import load_file

    classifier = EvalDigitNet()
    classifier.load_state_dict(load_file(Path(path)))
    return classifier.eval().requires_grad_(False)


def load_real_digits(resolution: int = DIGITS_RESOLUTION, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out `real` split `(images, labels)` that generated digits are compared with."""
    return load_digit_splits(resolution, seed)["real"]


def evaluate_real_reference(
    eval_classifier: EvalDigitNet, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_per_digit: int = 20
) -> dict[str, float]:
    """The metrics of real digits (the first `num_per_digit` of each digit in the `teacher` split) against the `real`
    split: the floor of FD and the ceiling of precision and recall at this sample size. Diversity is per digit."""
    images, labels = splits["teacher"]
    index = torch.cat([torch.nonzero(labels == digit).flatten()[:num_per_digit] for digit in range(NUM_DIGITS)])
    prompts = [digit_prompt(int(digit)) for digit in labels[index]]
    return evaluate_digits(eval_classifier, images[index], labels[index], prompts, splits["real"][0])


def _accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_digits(classifier, images) == labels).double().mean())


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in module.state_dict().items()}, path)


def build_testbed(
    cache_dir: str | Path | None = None,
    settings: DigitsBuildSettings | None = None,
    force: bool = False,
    progress: bool = True,
) -> DigitsTestbed:
    """Build the digits testbed, or reuse the cached build with the same version and settings.

    Args:
        cache_dir (`str` or `Path`, *optional*): parent folder of the builds; defaults to `default_cache_dir()`.
        settings ([`DigitsBuildSettings`], *optional*): training budgets; defaults to the full build.
        force (`bool`, *optional*, defaults to `False`): rebuild even if a cached build exists.
        progress (`bool`, *optional*, defaults to `True`): show tqdm bars.

    Returns:
        [`DigitsTestbed`]: the paths and the build report (timings, classifier accuracies on the held-out real
        digits, the teacher's gate metrics). Check `gate_passed` before using the teacher as a yardstick.
    """
    settings = settings or DigitsBuildSettings()
    root = Path(cache_dir or default_cache_dir()) / settings.cache_key()
    if (root / "build.json").is_file() and not force:
        logger.info("Reusing the digits testbed at %s", root)
        return DigitsTestbed(root, json.loads((root / "build.json").read_text()))

    staging = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    seconds, start = {}, time.perf_counter()
    splits = load_digit_splits(DIGITS_RESOLUTION, settings.seed)
    real_images, real_labels = splits["real"]

    # 1. The two classifiers, each on its own split.
    begin = time.perf_counter()
    torch.manual_seed(settings.seed)
    reward_classifier = train_classifier(
        RewardDigitNet(), *splits["reward"], num_steps=settings.reward_steps, seed=settings.seed, progress=progress
    )
    _save_safetensors(reward_classifier, staging / "reward_classifier.safetensors")
    torch.manual_seed(settings.seed)
    eval_classifier = train_classifier(
        EvalDigitNet(), *splits["eval"], num_steps=settings.eval_steps, seed=settings.seed, progress=progress
    )
    _save_safetensors(eval_classifier, staging / "eval_classifier.safetensors")
    seconds["classifiers"] = time.perf_counter() - begin

    # 2. The teacher: autoencoder, then the U-Net on its latents, then the pipeline folder.
    teacher_images, teacher_labels = splits["teacher"]
    begin = time.perf_counter()
    vae = train_vae(
        digits_vae(settings.seed), teacher_images, num_steps=settings.vae_steps, seed=settings.seed, progress=progress
    )
    seconds["vae"] = time.perf_counter() - begin
    begin = time.perf_counter()
    text_components = digits_text_components(settings.seed)
    latents = encode_latents(vae, teacher_images, generator=torch.Generator().manual_seed(settings.seed))
    unet = train_unet(
        digits_unet(settings.seed, tuple(settings.unet_block_out_channels)),
        latents,
        teacher_labels,
        text_components,
        num_steps=settings.unet_steps,
        seed=settings.seed,
        progress=progress,
    )
    seconds["unet"] = time.perf_counter() - begin
    teacher = assemble_teacher(vae, unet, text_components)
    teacher.save_pretrained(staging / "teacher", safe_serialization=True)
    write_prompts_file(staging / "prompts.txt")

    # 3. The quality gate, on the pipeline as saved.
    begin = time.perf_counter()
    samples = sample_digits(
        staging / "teacher",
        num_per_digit=settings.gate_num_per_digit,
        num_inference_steps=settings.gate_num_inference_steps,
        guidance_scale=settings.gate_guidance_scale,
        seed=settings.seed,
        progress=progress,
    )
    gate = evaluate_digits(eval_classifier, samples.images, samples.digits, samples.prompts, real_images)
    gate.update(
        num_inference_steps=settings.gate_num_inference_steps,
        guidance_scale=settings.gate_guidance_scale,
        num_samples=len(samples.images),
        samples_per_second=samples.samples_per_second,
        nfe_per_sample=samples.nfe_per_sample,
    )
    seconds["gate"] = time.perf_counter() - begin
    seconds["total"] = time.perf_counter() - start

    report = {
        "version": DIGITS_TESTBED_VERSION,
        "settings": asdict(settings),
        "resolution": DIGITS_RESOLUTION,
        "split_sizes": {name: len(labels) for name, (_, labels) in splits.items()},
        "vae_scaling_factor": vae.config.scaling_factor,
        "reward_classifier_real_accuracy": _accuracy(reward_classifier, real_images, real_labels),
        "eval_classifier_real_accuracy": _accuracy(eval_classifier, real_images, real_labels),
        "teacher_gate": gate,
        "real_reference": evaluate_real_reference(eval_classifier, splits, settings.gate_num_per_digit),
        "seconds": seconds,
        "torch_num_threads": torch.get_num_threads(),
    }
    report_text = json.dumps(report, indent=2) + "\n"
    (staging / "build.json").write_text(report_text)
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return DigitsTestbed(root, json.loads(report_text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusers_dmdr.digits", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache_dir", default=None, help=f"parent folder of the builds (default: {default_cache_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--unet_steps", type=int, default=DigitsBuildSettings.unet_steps)
    parser.add_argument("--vae_steps", type=int, default=DigitsBuildSettings.vae_steps)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    testbed = build_testbed(
        args.cache_dir,
        DigitsBuildSettings(unet_steps=args.unet_steps, vae_steps=args.vae_steps),
        force=args.force,
    )
    report = testbed.report
    gate = report["teacher_gate"]
    lines = [
        f"digits testbed: {testbed.root}",
        f"  teacher:        {testbed.teacher_dir}",
        f"  prompts:        {testbed.prompts_file}",
        f"  reward:         --reward {testbed.reward_spec()}",
        f"  eval weights:   {testbed.eval_weights}",
        f"  classifiers on real held-out digits: reward {report['reward_classifier_real_accuracy']:.3f}, "
        f"eval {report['eval_classifier_real_accuracy']:.3f}",
        f"  teacher gate ({gate['num_inference_steps']} steps, CFG {gate['guidance_scale']}, {gate['num_samples']} samples): "
        f"accuracy {gate['accuracy']:.3f}, FD {gate['fd']:.2f}, precision {gate['precision']:.3f}, "
        f"recall {gate['recall']:.3f}, diversity {gate['diversity']:.2f}",
        "  real digits vs real (reference): "
        + ", ".join(f"{name} {value:.3f}" for name, value in report["real_reference"].items()),
        "  build seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in report["seconds"].items()),
    ]
    print("\n".join(lines))  # noqa: T201
    if not testbed.gate_passed:
        raise SystemExit(
            f"The teacher misses the quality gate (accuracy < {TEACHER_GATE_ACCURACY}); rebuild with more --unet_steps."
        )


if __name__ == "__main__":
    main()
