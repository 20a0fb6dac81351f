"""Build, cache and load the digit-pairs testbed: teacher pipeline, reward classifier, evaluation classifier, prompts.

Command line (prints the paths, the timings and the teacher's pair-accuracy band check):

```
python -m diffusers_dmdr.digits [--cache_dir DIR] [--force] [--num_threads 1]
python -m diffusers_dmdr.digits --budget_curve 250 500 1000 1500 2000   # how the teacher budget was chosen
```

The artefacts go to `<cache_dir>/<DIGITS_TESTBED_VERSION>-<hash of the build settings>/`:

```
teacher/                          a StableDiffusionXLPipeline folder (DiffusionPipeline.from_pretrained loads it)
reward_classifier.safetensors     RewardDigitNet weights, for DigitPairReward(model=...)
eval_classifier.safetensors       EvalDigitNet weights, for load_eval_classifier(...)
prompts.txt                       the student's 320 training prompts (held-out pairs left out), for --train_prompts
eval_prompts.txt                  the 80 prompts of the 20 held-out pairs
build.json                        settings, timings, split sizes, classifier accuracies, the teacher gate metrics
```

A folder with a `build.json` is reused as is; a build writes to a temporary folder that is renamed at the end, so an
interrupted build never leaves a half-written cache behind.

The classifiers read single 32 x 32 digits (each half of a pair on its own); the teacher is trained on 32 x 64 pair
images composed from the `teacher` split, with all 100 pairs in all four phrasings (`diffusers_dmdr.digits.pairs`).
"""

import argparse
import copy
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
from .data import DIGITS_RESOLUTION, load_digit_splits, write_prompts_file
from .metrics import evaluate_pairs, predict_pairs
from .pairs import (
    ALL_PAIRS,
    HELD_OUT_PAIRS,
    PAIR_HEIGHT,
    PAIR_TEMPLATES,
    PAIR_WIDTH,
    eval_pair_prompts,
    pair_prompts,
    random_pairs,
    sample_real_pairs,
    train_pair_prompts,
)
from .sampling import pair_sample_prompts, sample_pairs
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
DIGITS_TESTBED_VERSION = "digit-pairs-v2"
# Environment variable that moves the default cache (`~/.cache/diffusers_dmdr/digits`).
CACHE_ENV_VARIABLE = "DIFFUSERS_DMDR_CACHE"
# The teacher's best setting (docs/digits.md): 50 Euler steps with classifier-free guidance.
TEACHER_NUM_INFERENCE_STEPS = 50
TEACHER_GUIDANCE_SCALE = 3.0
# The teacher must be good but not saturated on the held-out pairs (issue 12): its pair accuracy at its best
# setting lies in this closed band.
TEACHER_PAIR_ACCURACY_BAND = (0.40, 0.85)
# Random pair images encoded once for the teacher's U-Net (about 80 per pair).
LATENT_POOL_SIZE = 8000


@dataclass
class DigitsBuildSettings:
    """Training budgets of the testbed's models.

    Args:
        vae_steps (`int`, *optional*, defaults to 200): autoencoder steps (batch 32 pair images).
        unet_steps (`int`, *optional*, defaults to 1500): teacher U-Net steps (batch 64). To be chosen with
            `teacher_budget_curve` so that the teacher's held-out pair accuracy is inside the band; 1500 is the
            curve's choice (pair accuracy 0.506 at CFG 3; docs/digits.md, "Measured numbers").
        vae_block_out_channels (`tuple[int, ...]`, *optional*, defaults to `(16, 32, 32, 32)`): autoencoder widths;
            four blocks give SD's spatial factor 8 (a pair latent is 4 x 4 x 8).
        unet_block_out_channels (`tuple[int, ...]`, *optional*, defaults to `(32, 64)`): U-Net widths, one level
            each.
        train_text_encoders (`bool`, *optional*, defaults to `True`): train the two text encoders with the U-Net
            (they start random, standing in for pretrained encoders; docs/digits.md).
        unet_warmup_steps (`int`, *optional*, defaults to 100): linear warm-up, then a constant learning rate (so
            that a long run's EMA after `k` steps is the `k`-step teacher).
        reward_steps (`int`, *optional*, defaults to 300): reward classifier steps (batch 64 single digits).
        eval_steps (`int`, *optional*, defaults to 300): evaluation classifier steps (batch 64 single digits).
        latent_pool_size (`int`, *optional*, defaults to 8000): random pair images encoded for the U-Net.
        gate_num_per_pair (`int`, *optional*, defaults to 8): teacher samples per held-out pair for the gate.
        gate_num_inference_steps (`int`, *optional*, defaults to 50): teacher steps for the gate.
        gate_guidance_scale (`float`, *optional*, defaults to 3.0): teacher CFG scale for the gate.
        real_num_per_pair (`int`, *optional*, defaults to 20): real pairs per held-out pair in the FD reference and
            the classifiers' pair accuracy.
        seed (`int`, *optional*, defaults to 0): seeds every model and the data split.
    """

    vae_steps: int = 200
    unet_steps: int = 1500
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    train_text_encoders: bool = True
    unet_warmup_steps: int = 100
    reward_steps: int = 300
    eval_steps: int = 300
    latent_pool_size: int = LATENT_POOL_SIZE
    gate_num_per_pair: int = 8
    gate_num_inference_steps: int = TEACHER_NUM_INFERENCE_STEPS
    gate_guidance_scale: float = TEACHER_GUIDANCE_SCALE
    real_num_per_pair: int = 20
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
    def eval_prompts_file(self) -> Path:
        return self.root / "eval_prompts.txt"

    @property
    def gate_passed(self) -> bool:
        """Whether the teacher's held-out pair accuracy is inside `TEACHER_PAIR_ACCURACY_BAND`."""
        low, high = TEACHER_PAIR_ACCURACY_BAND
        return low <= self.report["teacher_gate"]["pair_accuracy"] <= high

    def reward_spec(self, weight: float = 1.0) -> str:
        """The trainer's `--reward` value for the pair reward, linear (a log-probability never reaches a hinge)."""
        return f"diffusers_dmdr.digits.reward.DigitPairReward:{weight}:hinge=none:model={self.reward_weights}"


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


def real_pairs(
    split: tuple[torch.Tensor, torch.Tensor],
    pairs=HELD_OUT_PAIRS,
    num_per_pair: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_per_pair` real pair images of every pair in `pairs` (pair-major) from one split's single digits.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: images `(N, 3, 32, 64)` and the pairs `(N, 2)`.
    """
    labels = torch.tensor(pairs).repeat_interleave(num_per_pair, dim=0)
    return sample_real_pairs(*split, labels, torch.Generator().manual_seed(seed)), labels


def load_real_pairs(num_per_pair: int = 20, seed: int = 0) -> torch.Tensor:
    """The held-out real pairs that generated pairs are compared with: the held-out pairs, from the `real` split."""
    return real_pairs(load_digit_splits()["real"], HELD_OUT_PAIRS, num_per_pair, seed)[0]


def evaluate_real_reference(
    eval_classifier: EvalDigitNet, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_per_pair: int = 8
) -> dict[str, float]:
    """The metrics of real pairs made from the `teacher` split (`num_per_pair` per held-out pair, the prompts cycling
    like the generated rows') against the `real` pairs: the floor of FD and the ceiling of precision and recall at
    this sample size."""
    images, labels = real_pairs(splits["teacher"], HELD_OUT_PAIRS, num_per_pair, seed=1)
    prompts, _ = pair_sample_prompts(HELD_OUT_PAIRS, num_per_pair)
    return evaluate_pairs(eval_classifier, images, labels, prompts, load_real_pairs_from(splits))


def load_real_pairs_from(splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_per_pair: int = 20) -> torch.Tensor:
    """`load_real_pairs(num_per_pair)` from already loaded splits."""
    return real_pairs(splits["real"], HELD_OUT_PAIRS, num_per_pair)[0]


def _accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_digits(classifier, images) == labels).double().mean())


def _pair_accuracy(classifier, split: tuple[torch.Tensor, torch.Tensor], num_per_pair: int = 20) -> float:
    """Fraction of real held-out pairs (from `split`) whose two halves the classifier both reads right."""
    images, pairs = real_pairs(split, HELD_OUT_PAIRS, num_per_pair=num_per_pair, seed=2)
    return float((predict_pairs(classifier, images) == pairs).all(dim=1).double().mean())


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in module.state_dict().items()}, path)


def train_classifiers(splits, settings: DigitsBuildSettings, progress: bool = True):
    """The reward and evaluation classifiers, each on its own split of single digits."""
    torch.manual_seed(settings.seed)
    reward_classifier = train_classifier(
        RewardDigitNet(), *splits["reward"], num_steps=settings.reward_steps, seed=settings.seed, progress=progress
    )
    torch.manual_seed(settings.seed)
    eval_classifier = train_classifier(
        EvalDigitNet(), *splits["eval"], num_steps=settings.eval_steps, seed=settings.seed, progress=progress
    )
    return reward_classifier, eval_classifier


def train_teacher_vae_and_latents(splits, settings: DigitsBuildSettings, progress: bool = True):
    """The autoencoder (trained on random pairs of the `teacher` split) and the U-Net's pool of pair latents.

    Returns:
        `tuple`: the VAE, latents `(P, 4, 4, 8)` (with the default factor-8 autoencoder) and their pair labels `left * 10 + right`, `(P,)`.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    teacher_split = splits["teacher"]
    pool_pairs = random_pairs(settings.latent_pool_size, generator)
    pool_images = sample_real_pairs(*teacher_split, pool_pairs, generator)
    vae = train_vae(
        digits_vae(settings.seed, (PAIR_HEIGHT, PAIR_WIDTH), tuple(settings.vae_block_out_channels)),
        pool_images,
        num_steps=settings.vae_steps,
        seed=settings.seed,
        progress=progress,
    )
    latents = encode_latents(vae, pool_images, generator=generator)
    return vae, latents, pool_pairs[:, 0] * 10 + pool_pairs[:, 1]


def train_teacher_unet(
    vae_latents_labels,
    text_components,
    settings: DigitsBuildSettings,
    num_steps=None,
    step_callback=None,
    progress=True,
):
    """The teacher's U-Net on the pair latents, all 100 pairs in every phrasing (prompts pair-major)."""
    _, latents, labels = vae_latents_labels
    return train_unet(
        digits_unet(settings.seed, tuple(settings.unet_block_out_channels), sample_size=tuple(latents.shape[2:])),
        latents,
        labels,
        text_components,
        num_steps=num_steps or settings.unet_steps,
        resolution=(PAIR_HEIGHT, PAIR_WIDTH),
        seed=settings.seed,
        progress=progress,
        prompts=pair_prompts(ALL_PAIRS),
        num_templates=len(PAIR_TEMPLATES),
        warmup_steps=settings.unet_warmup_steps,
        train_text_encoders=settings.train_text_encoders,
        step_callback=step_callback,
    )


def gate_metrics(
    teacher, eval_classifier, real_images, settings: DigitsBuildSettings, guidance_scale=None, progress=True
):
    """The teacher's metrics on the held-out pairs at the gate's sampling setting (`guidance_scale` overrides it)."""
    guidance_scale = settings.gate_guidance_scale if guidance_scale is None else guidance_scale
    samples = sample_pairs(
        teacher,
        HELD_OUT_PAIRS,
        num_per_pair=settings.gate_num_per_pair,
        num_inference_steps=settings.gate_num_inference_steps,
        guidance_scale=guidance_scale,
        seed=settings.seed,
        progress=progress,
    )
    gate = evaluate_pairs(eval_classifier, samples.images, samples.digits, samples.prompts, real_images)
    gate.update(
        num_inference_steps=settings.gate_num_inference_steps,
        guidance_scale=guidance_scale,
        num_samples=len(samples.images),
        samples_per_second=samples.samples_per_second,
        nfe_per_sample=samples.nfe_per_sample,
    )
    return gate


def build_testbed(
    cache_dir: str | Path | None = None,
    settings: DigitsBuildSettings | None = None,
    force: bool = False,
    progress: bool = True,
) -> DigitsTestbed:
    """Build the digit-pairs testbed, or reuse the cached build with the same version and settings.

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
    real_pair_images = load_real_pairs_from(splits, settings.real_num_per_pair)

    # 1. The two classifiers, each on its own split of single digits.
    begin = time.perf_counter()
    reward_classifier, eval_classifier = train_classifiers(splits, settings, progress)
    _save_safetensors(reward_classifier, staging / "reward_classifier.safetensors")
    _save_safetensors(eval_classifier, staging / "eval_classifier.safetensors")
    seconds["classifiers"] = time.perf_counter() - begin

    # 2. The teacher: autoencoder and latent pool, then the U-Net, then the pipeline folder.
    begin = time.perf_counter()
    vae_latents_labels = train_teacher_vae_and_latents(splits, settings, progress)
    seconds["vae"] = time.perf_counter() - begin
    begin = time.perf_counter()
    text_components = digits_text_components(settings.seed)
    unet = train_teacher_unet(vae_latents_labels, text_components, settings, progress=progress)
    seconds["unet"] = time.perf_counter() - begin
    vae = vae_latents_labels[0]
    teacher = assemble_teacher(vae, unet, text_components)
    teacher.save_pretrained(staging / "teacher", safe_serialization=True)
    write_prompts_file(staging / "prompts.txt", train_pair_prompts())
    write_prompts_file(staging / "eval_prompts.txt", eval_pair_prompts())

    # 3. The pair-accuracy band, on the pipeline as saved.
    begin = time.perf_counter()
    gate = gate_metrics(staging / "teacher", eval_classifier, real_pair_images, settings, progress=progress)
    seconds["gate"] = time.perf_counter() - begin
    seconds["total"] = time.perf_counter() - start

    report = {
        "version": DIGITS_TESTBED_VERSION,
        "settings": asdict(settings),
        "height": PAIR_HEIGHT,
        "width": PAIR_WIDTH,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "split_sizes": {name: len(labels) for name, (_, labels) in splits.items()},
        "vae_scaling_factor": vae.config.scaling_factor,
        "reward_classifier_real_accuracy": _accuracy(reward_classifier, real_images, real_labels),
        "eval_classifier_real_accuracy": _accuracy(eval_classifier, real_images, real_labels),
        "eval_classifier_real_pair_accuracy": _pair_accuracy(
            eval_classifier, splits["real"], settings.real_num_per_pair
        ),
        "reward_classifier_real_pair_accuracy": _pair_accuracy(
            reward_classifier, splits["real"], settings.real_num_per_pair
        ),
        "teacher_gate": gate,
        "teacher_accuracy_band": list(TEACHER_PAIR_ACCURACY_BAND),
        "real_reference": evaluate_real_reference(eval_classifier, splits, settings.gate_num_per_pair),
        "seconds": seconds,
        "torch_num_threads": torch.get_num_threads(),
    }
    report_text = json.dumps(report, indent=2) + "\n"
    (staging / "build.json").write_text(report_text)
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return DigitsTestbed(root, json.loads(report_text))


def teacher_budget_curve(
    checkpoints: list[int],
    settings: DigitsBuildSettings | None = None,
    guidance_scales: tuple[float, ...] = (2.0, 3.0, 5.0),
    progress: bool = True,
) -> list[dict]:
    """The teacher's held-out pair accuracy against its U-Net budget: how `DigitsBuildSettings.unet_steps` is chosen.

    One U-Net run of `max(checkpoints)` steps; at each checkpoint its EMA is sampled at the gate's setting with every
    CFG scale of `guidance_scales`. With the constant learning rate after warm-up, the EMA after `k` steps of this
    run is exactly the teacher that a `k`-step build trains, so one run gives the whole curve.

    Returns:
        `list[dict]`: one entry per checkpoint and scale: `unet_steps`, `guidance_scale` and the gate metrics.
    """
    settings = settings or DigitsBuildSettings()
    splits = load_digit_splits(DIGITS_RESOLUTION, settings.seed)
    real_pair_images = load_real_pairs_from(splits, settings.real_num_per_pair)
    _, eval_classifier = train_classifiers(splits, settings, progress)
    vae_latents_labels = train_teacher_vae_and_latents(splits, settings, progress)
    text_components = digits_text_components(settings.seed)
    wanted, curve = set(checkpoints), []

    def evaluate(step: int, ema_unet, ema_text_components: dict) -> None:
        if step not in wanted:
            return
        # The EMA modules keep training after this checkpoint: the teacher gets copies (the tokenizers are shared).
        encoders = {name: copy.deepcopy(ema_text_components[name]) for name in ("text_encoder", "text_encoder_2")}
        teacher = assemble_teacher(
            vae_latents_labels[0], copy.deepcopy(ema_unet).eval(), {**ema_text_components, **encoders}
        )
        for scale in guidance_scales:
            metrics = gate_metrics(teacher, eval_classifier, real_pair_images, settings, scale, progress=False)
            curve.append({"unet_steps": step, **metrics})
            logger.info(
                "U-Net step %d, CFG %g: pair accuracy %.3f (left %.3f, right %.3f), FD %.2f",
                step,
                scale,
                metrics["pair_accuracy"],
                metrics["left_accuracy"],
                metrics["right_accuracy"],
                metrics["fd"],
            )

    train_teacher_unet(
        vae_latents_labels,
        text_components,
        settings,
        num_steps=max(checkpoints),
        step_callback=evaluate,
        progress=progress,
    )
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusers_dmdr.digits", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache_dir", default=None, help=f"parent folder of the builds (default: {default_cache_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--unet_steps", type=int, default=DigitsBuildSettings.unet_steps)
    parser.add_argument("--vae_steps", type=int, default=DigitsBuildSettings.vae_steps)
    parser.add_argument(
        "--budget_curve",
        type=int,
        nargs="+",
        default=None,
        help="instead of building, measure the teacher's held-out pair accuracy after these U-Net step counts",
    )
    parser.add_argument("--budget_curve_json", default=None, help="write the budget curve to this JSON file")
    parser.add_argument(
        "--guidance_scales",
        type=float,
        nargs="+",
        default=[2.0, 3.0, 5.0],
        help="CFG scales at which the budget curve samples each checkpoint (default: 2 3 5)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = DigitsBuildSettings(unet_steps=args.unet_steps, vae_steps=args.vae_steps)
    if args.budget_curve:
        curve = teacher_budget_curve(sorted(args.budget_curve), settings, tuple(args.guidance_scales))
        if args.budget_curve_json:
            Path(args.budget_curve_json).write_text(json.dumps(curve, indent=1) + "\n")
        for entry in curve:
            print(  # noqa: T201
                f"steps {entry['unet_steps']:>5}  CFG {entry['guidance_scale']:>4g}  pair accuracy "
                f"{entry['pair_accuracy']:.3f}  left {entry['left_accuracy']:.3f}  right {entry['right_accuracy']:.3f}"
                f"  FD {entry['fd']:.2f}  recall {entry['recall']:.3f}"
            )
        return
    testbed = build_testbed(args.cache_dir, settings, force=args.force)
    report = testbed.report
    gate = report["teacher_gate"]
    low, high = TEACHER_PAIR_ACCURACY_BAND
    lines = [
        f"digit-pairs testbed: {testbed.root}",
        f"  teacher:        {testbed.teacher_dir}",
        f"  prompts:        {testbed.prompts_file} (held-out: {testbed.eval_prompts_file})",
        f"  reward:         --reward {testbed.reward_spec()}",
        f"  eval weights:   {testbed.eval_weights}",
        f"  classifiers on real held-out digits: reward {report['reward_classifier_real_accuracy']:.3f}, "
        f"eval {report['eval_classifier_real_accuracy']:.3f}",
        f"  teacher on held-out pairs ({gate['num_inference_steps']} steps, CFG {gate['guidance_scale']}, "
        f"{gate['num_samples']} samples): pair accuracy {gate['pair_accuracy']:.3f} (band {low}-{high}), "
        f"per half {gate['accuracy']:.3f}, FD {gate['fd']:.2f}, precision {gate['precision']:.3f}, "
        f"recall {gate['recall']:.3f}, diversity {gate['diversity']:.2f}",
        "  real pairs vs real (reference): "
        + ", ".join(f"{name} {value:.3f}" for name, value in report["real_reference"].items()),
        "  build seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in report["seconds"].items()),
    ]
    print("\n".join(lines))  # noqa: T201
    if not testbed.gate_passed:
        raise SystemExit(
            f"The teacher's held-out pair accuracy {gate['pair_accuracy']:.3f} is outside the band {low}-{high}; "
            "see `--budget_curve` and docs/digits.md for choosing --unet_steps."
        )


if __name__ == "__main__":
    main()
