"""`make reproduce`: a small-scale, multi-seed reproduction of the DMDR paper's claims on the digit-pairs testbed.

```
python -m diffusers_dmdr.digits.reproduce --output_dir outputs/reproduce --docs docs/reproduction.md
```

Every run trains in this process (`DMDRTrainer(...).train()`, a fresh teacher each) on the cached testbed. Per seed:

- stage 1 with DynaDG + DynaRS (`stage1`): DMD only, 4 steps, scored by FD at its checkpoints (a trainer callback);
  its last checkpoint is the shared start of every stage-2 arm: `dmd_4step` (DMD continued, no reward),
  `dmdr_4step` (DMD + reward, weight `reward_weight`), `dmdr_w_low` / `dmdr_w_high` (the reward-weight sweep),
  `dmdr_cfg_off` / `dmdr_cfg_high` (real-score CFG in stage 2), `rl_only` (reward alone, `dmd_loss_weight=0`) and
  `rl_anchor` (reward + an L2 anchor to the stage-1 student instead of DMD);
- stage 1 without DynaDG / DynaRS (`stage1_no_dyna`, `dynamic_steps=0`) and with RT-DM (`stage1_rtdm`), scored the
  same way (the cold-start and RT-DM comparisons).

The reward is the testbed's deliberately hackable one (`DigitPairReward`: a 25k-parameter CNN trained on a few hundred
single digits, read per half); the judge is the separate evaluation classifier. Every student and the 50-step CFG
teacher are evaluated on the held-out pairs with identical noise per seed; the claims are checked with the fixed rules
of `diffusers_dmdr.digits.claims`, and the tables, plots, `results.json` and the markdown report are written.
"""

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..callbacks import TrainerCallback
from ..config import DMDRConfig
from .build import DigitsTestbed, build_testbed, evaluate_real_reference, load_eval_classifier, load_real_pairs_from
from .claims import check_claims
from .data import load_digit_splits
from .metrics import frechet_distance, pair_features
from .pairs import HELD_OUT_PAIRS
from .recipe import REWARD_CLASS, digits_recipe
from .report import evaluate_row
from .reproduce_report import (
    ARM_DESCRIPTIONS,
    early_fd_curves,
    machine_description,
    mean_std,
    metrics_table,
    plot_early_fd,
    plot_reward_curves,
    reward_curves,
    summarise,
    write_report,
)
from .sampling import DigitSamples, pair_sample_prompts, sample_pairs


logger = logging.getLogger(__name__)

__all__ = ["ArmResult", "EarlyFD", "Reproduction", "ReproductionSettings", "check_claims", "mean_std", "main"]


@dataclass
class ReproductionSettings:
    """Budgets of the reproduction (defaults: sized for 60 minutes on a shared 2-core CPU).

    Args:
        seeds (`list[int]`): training seeds; each arm runs once per seed.
        stage1_steps (`int`): generator updates of stage 1 (DMD only, the cold start).
        stage2_steps (`int`): generator updates after stage 1 (DMD + reward, or the ablations).
        dynamic_steps (`int`): DynaDG/DynaRS annealing length, within stage 1.
        train_batch_size (`int`): prompts per iteration.
        update_ratio (`int`): fake-score updates per generator update (TTUR) in the runs that train DMD.
        reward_weight (`float`): weight of the (linear) log-probability reward of DMDR.
        reward_weight_low (`float`), reward_weight_high (`float`): the ends of the reward-weight sweep (the high
            end is in the range where the demo's reward is hacked).
        rtdm_tilt_strength (`float`): tilt strength of the RT-DM arm: each sample's DMD direction is weighted by
            `B * softmax(strength * z)`, `z` the batch z-score of its reward (the reward's weight does not matter).
        anchor_weight (`float`): weight of the L2 anchor of `rl_anchor`.
        cfg_moderate (`float`): real-score CFG of the DMDR runs (the recipe's).
        cfg_high (`float`): real-score CFG of `dmdr_cfg_high` in stage 2.
        early_every (`int`): score stage 1 by FD every this many generator updates.
        num_per_pair (`int`): evaluation samples per held-out pair (per arm and seed).
        early_num_per_pair (`int`): samples per held-out pair of the early-checkpoint FD.
        teacher_steps (`int`): teacher sampler steps.
        teacher_guidance_scale (`float`): teacher CFG.
        real_num_per_pair (`int`): real pairs per held-out pair that the samples are compared with.
        eval_seed (`int`): first noise seed of the evaluation; seed `s` uses `eval_seed + 10000 * s + i`.
        num_threads (`int`): torch CPU threads.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stage1_steps: int = 30
    stage2_steps: int = 40
    dynamic_steps: int = 20
    train_batch_size: int = 16
    update_ratio: int = 5
    reward_weight: float = 0.01
    reward_weight_low: float = 0.002
    reward_weight_high: float = 0.15
    rtdm_tilt_strength: float = 0.5
    anchor_weight: float = 1.0
    cfg_moderate: float = 3.0
    cfg_high: float = 8.0
    early_every: int = 10
    num_per_pair: int = 8
    early_num_per_pair: int = 4
    teacher_steps: int = 50
    teacher_guidance_scale: float = 3.0
    real_num_per_pair: int = 20
    eval_seed: int = 1000
    num_threads: int = 1


def arm_seed_noise(settings: ReproductionSettings, seed: int) -> int:
    """First evaluation noise seed of training seed `seed`: every arm of that seed (and the teacher) uses it."""
    return settings.eval_seed + 10000 * seed


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def reward_spec(testbed: DigitsTestbed, weight: float) -> dict:
    return {"name": REWARD_CLASS, "weight": weight, "hinge": None, "model": str(testbed.reward_weights)}


def make_config(testbed: DigitsTestbed, output_dir: Path, settings: ReproductionSettings, **overrides) -> DMDRConfig:
    """The demo recipe (`digits.recipe`) with the testbed's paths, the reproduction's budgets and `overrides`;
    trackers, validation grids and intermediate checkpoints off unless overridden. A copy of the resolved recipe is
    written to `output_dir/digits_recipe.yaml`."""
    values = {
        "train_batch_size": settings.train_batch_size,
        "update_ratio": settings.update_ratio,
        "dynamic_steps": settings.dynamic_steps,
        "real_guidance_scale": settings.cfg_moderate,
        "report_to": "none",
        "validation_prompts": None,
        "checkpointing_steps": 10**9,
        "checkpoints_total_limit": 2,
        "reward": [reward_spec(testbed, settings.reward_weight)],
    }
    values.update(overrides)
    output_dir.mkdir(parents=True, exist_ok=True)
    values = digits_recipe(testbed, output_dir, values)
    recipe = output_dir / "digits_recipe.yaml"
    recipe.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return DMDRConfig.from_yaml(recipe)


def load_rewards_of(config: DMDRConfig) -> list:
    from ..rewards import load_rewards

    return load_rewards(config.reward, "cpu") if config.reward else []


def new_trainer(config: DMDRConfig, prompts: list[str], callbacks=None):
    """A trainer on a freshly loaded teacher (the trainer takes ownership of the teacher's backbone)."""
    from ..families import get_family
    from ..trainer import DMDRTrainer

    teacher = get_family(config.family).load_teacher(config.pretrained_model_name_or_path)
    return DMDRTrainer(config, teacher, prompts, load_rewards_of(config), callbacks=callbacks)


@torch.no_grad()
def sample_student(trainer, num_per_pair: int, noise_seed: int, batch_size: int = 80) -> DigitSamples:
    """The student's own N-step sampler on the held-out pairs, with sample `i` starting from the noise of
    `torch.Generator().manual_seed(noise_seed + i)`, as `sample_pairs` gives the teacher."""
    prompts, pairs = pair_sample_prompts(HELD_OUT_PAIRS, num_per_pair)
    was_training = trainer.student_model.training
    trainer.student_model.eval()
    images, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        # Per-sample noise identical to the teacher's; the SDE re-noising draws from one generator per batch.
        initial_noise = torch.cat(
            [
                trainer.initial_noise(1, torch.Generator().manual_seed(noise_seed + start + i))
                for i in range(len(batch_prompts))
            ]
        )
        begin = time.perf_counter()
        latents = trainer.sample_latents(
            batch_prompts, torch.Generator().manual_seed(noise_seed + start), initial_noise=initial_noise
        )
        images.append(trainer.decode(latents).float().cpu().clamp(0.0, 1.0))
        seconds += time.perf_counter() - begin
    trainer.student_model.train(was_training)
    return DigitSamples(
        images=torch.cat(images),
        prompts=prompts,
        digits=pairs,
        seconds=seconds,
        nfe_per_sample=trainer.config.num_student_steps,
    )


class EarlyFD(TrainerCallback):
    """A trainer callback: FD of the student against the real pairs each time the trainer writes a checkpoint.

    Cheaper than reloading `checkpoint-k/`: the student is scored with its own sampler at the moment the checkpoint is
    written, on fixed noise. `score(trainer)` also scores it on demand (step 0).
    """

    def __init__(self, eval_classifier, real_features: torch.Tensor, num_per_pair: int, noise_seed: int):
        self.eval_classifier, self.real_features = eval_classifier, real_features
        self.num_per_pair, self.noise_seed = num_per_pair, noise_seed
        self.curve: list[tuple[int, float]] = []

    def score(self, trainer) -> float:
        samples = sample_student(trainer, self.num_per_pair, self.noise_seed)
        fd = frechet_distance(self.real_features, pair_features(self.eval_classifier, samples.images))
        self.curve.append((trainer.state.global_step, fd))
        return fd

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        self.score(trainer)


@dataclass
class ArmResult:
    """One trained arm of one seed: its metrics, its reward curve and (stage 1) its early-FD curve."""

    metrics: dict
    history: list[dict]
    early_fd: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0


class Reproduction:
    """Runs every arm of every seed in process and collects the results.

    Args:
        testbed ([`DigitsTestbed`]): the built testbed.
        output_dir (`Path`): run folders (`seed-<s>/<arm>/`).
        settings ([`ReproductionSettings`]): the budgets.
        progress (`bool`): tqdm bar over the arms (with the ETA of the whole run).
    """

    def __init__(self, testbed: DigitsTestbed, output_dir: Path, settings: ReproductionSettings, progress=True):
        self.testbed, self.output_dir, self.settings, self.progress = testbed, output_dir, settings, progress
        self.splits = load_digit_splits()
        self.real_images = load_real_pairs_from(self.splits, settings.real_num_per_pair)
        self.eval_classifier = load_eval_classifier(testbed.eval_weights)
        self.real_features = pair_features(self.eval_classifier, self.real_images)
        self.prompts = [line for line in testbed.prompts_file.read_text().splitlines() if line.strip()]
        self.results: dict[str, dict[int, ArmResult]] = {}

    # -- one arm ---------------------------------------------------------------------------------------------------
    def train_arm(self, name: str, seed: int, early_fd: bool = False, **overrides) -> ArmResult:
        """Train one arm (in process), evaluate it on the seed's noise and record it under `results[name][seed]`."""
        settings = self.settings
        config = make_config(self.testbed, self.output_dir / f"seed-{seed}" / name, settings, seed=seed, **overrides)
        noise_seed = arm_seed_noise(settings, seed)
        scorer = None
        if early_fd:
            scorer = EarlyFD(self.eval_classifier, self.real_features, settings.early_num_per_pair, noise_seed)
        trainer = new_trainer(config, self.prompts, callbacks=[scorer] if scorer else None)
        if scorer:
            scorer.score(trainer)  # step 0: the teacher's weights used as a 4-step student
        begin = time.perf_counter()
        history = trainer.train()
        train_seconds = time.perf_counter() - begin
        samples = sample_student(trainer, settings.num_per_pair, noise_seed)
        metrics = evaluate_row(samples, self.testbed, self.real_images, config.num_student_steps)
        metrics["train_seconds"] = train_seconds
        metrics["seconds_per_generator_step"] = train_seconds / max(len(history), 1)
        result = ArmResult(metrics, history, scorer.curve if scorer else [], train_seconds)
        self.results.setdefault(name, {})[seed] = result
        del trainer, scorer
        gc.collect()
        return result

    def evaluate_teacher(self, seed: int) -> None:
        """The teacher on the seed's evaluation noise (its spread over seeds is sampling noise only)."""
        settings = self.settings
        samples = sample_pairs(
            self.testbed.teacher_dir,
            HELD_OUT_PAIRS,
            num_per_pair=settings.num_per_pair,
            num_inference_steps=settings.teacher_steps,
            guidance_scale=settings.teacher_guidance_scale,
            seed=arm_seed_noise(settings, seed),
            progress=False,
        )
        metrics = evaluate_row(
            samples, self.testbed, self.real_images, settings.teacher_steps, settings.teacher_guidance_scale
        )
        self.results.setdefault("teacher", {})[seed] = ArmResult(metrics, [])

    # -- the plan --------------------------------------------------------------------------------------------------
    def jobs(self, seed: int) -> list[tuple[str, callable]]:
        """The runs of one seed, in dependency order (stage-1 runs before the arms that resume from them)."""
        s = self.settings
        s1, total = s.stage1_steps, s.stage1_steps + s.stage2_steps
        stage1_checkpoint = str((self.output_dir / f"seed-{seed}" / "stage1" / f"checkpoint-{s1}").resolve())
        stage1 = {"max_train_steps": s1, "cold_start_steps": s1, "reward": [], "checkpointing_steps": s.early_every}
        resumed = {"max_train_steps": total, "cold_start_steps": s1, "resume_from_checkpoint": stage1_checkpoint}
        # The reward-only arms leave the fake score idle, so extra TTUR iterations would only be discarded rollouts.
        no_dmd = {**resumed, "dmd_loss_weight": 0.0, "update_ratio": 1}

        def arm(name, **overrides):
            return name, lambda: self.train_arm(name, seed, **overrides)

        def weighted(weight):
            return [reward_spec(self.testbed, weight)]

        return [
            ("teacher", lambda: self.evaluate_teacher(seed)),
            ("stage1", lambda: self.train_arm("stage1", seed, early_fd=True, **stage1)),
            (
                "stage1_no_dyna",
                lambda: self.train_arm("stage1_no_dyna", seed, early_fd=True, **stage1, dynamic_steps=0),
            ),
            # RT-DM needs the reward in stage 1 (it tilts the DMD direction); stage 2 never starts.
            arm(
                "stage1_rtdm",
                **{**stage1, "reward": weighted(s.reward_weight)},
                reward_tilt=True,
                reward_tilt_strength=s.rtdm_tilt_strength,
            ),
            arm("dmd_4step", **{**resumed, "cold_start_steps": total, "reward": []}),
            arm("dmdr_4step", **resumed),
            arm("dmdr_w_low", **resumed, reward=weighted(s.reward_weight_low)),
            arm("dmdr_w_high", **resumed, reward=weighted(s.reward_weight_high)),
            arm("dmdr_cfg_off", **resumed, real_guidance_scale=1.0, guidance_scale_jitter=0.0),
            arm("dmdr_cfg_high", **resumed, real_guidance_scale=s.cfg_high),
            arm("rl_only", **no_dmd),
            arm("rl_anchor", **no_dmd, anchor_loss_weight=s.anchor_weight),
        ]

    def run(self, arms: list[str] | None = None) -> dict[str, float]:
        """Run every job of every seed (or only `arms` and what they depend on); returns seconds per job name."""
        all_jobs = [(seed, name, job) for seed in self.settings.seeds for name, job in self.jobs(seed)]
        if arms is not None:
            needed = set(arms)
            if needed - {"teacher", "stage1", "stage1_no_dyna", "stage1_rtdm"}:
                needed.add("stage1")
            all_jobs = [job for job in all_jobs if job[1] in needed]
        seconds: dict[str, float] = {}
        bar = tqdm(all_jobs, desc="make reproduce: arms", disable=not self.progress)
        for seed, name, job in bar:
            bar.set_postfix_str(f"seed {seed}: {name}")
            begin = time.perf_counter()
            job()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - begin
            logger.info("seed %d %s: %.0f s", seed, name, time.perf_counter() - begin)
        return seconds


def main(argv: list[str] | None = None) -> None:
    defaults = ReproductionSettings()
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dmdr.digits.reproduce", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output_dir", default="outputs/reproduce")
    parser.add_argument("--docs", default=None, help="write the markdown report here, figures next to it")
    parser.add_argument("--cache_dir", default=None, help="testbed cache (default: ~/.cache/diffusers_dmdr/digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (and the stage-1 run they need)")
    for name, value in asdict(defaults).items():
        if name in ("seeds", "eval_seed"):
            continue
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    settings = ReproductionSettings(
        **{key: getattr(args, key) for key in asdict(defaults) if hasattr(args, key) and key != "eval_seed"}
    )
    torch.set_num_threads(settings.num_threads)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    testbed = build_testbed(args.cache_dir)
    if not testbed.gate_passed:
        # Recorded in results.json (`teacher_in_accuracy_band`); claim 1 is then about an off-target teacher.
        logger.warning(
            "The teacher at %s is outside its pair-accuracy band (docs/digits.md); the claims still run.",
            testbed.teacher_dir,
        )
    reproduction = Reproduction(testbed, output_dir, settings)
    seconds = reproduction.run(args.arms)
    seconds["training"] = sum(value for key, value in seconds.items() if key != "teacher")
    results = reproduction.results

    summary = summarise(results)
    early = {
        "baseline": early_fd_curves(results, "stage1_no_dyna"),
        "+DynaDG+DynaRS": early_fd_curves(results, "stage1"),
    }
    claims = check_claims(summary, early, settings.dynamic_steps)
    real_reference = evaluate_real_reference(reproduction.eval_classifier, reproduction.splits, settings.num_per_pair)
    seconds["total"] = time.perf_counter() - start

    figures_dir = Path(args.docs).with_suffix("") if args.docs else output_dir
    figures_dir.mkdir(parents=True, exist_ok=True)
    curves = reward_curves(results)
    plot_reward_curves(curves, figures_dir / "training_rewards.png")
    plot_early_fd(early, figures_dir / "early_fd.png", settings.dynamic_steps)
    machine = machine_description(settings.num_threads)
    raw = {
        "settings": asdict(settings),
        "machine": machine,
        "teacher_dir": str(testbed.teacher_dir),
        "teacher_in_accuracy_band": testbed.gate_passed,
        "seconds": seconds,
        "summary": {arm: {key: list(value) for key, value in metrics.items()} for arm, metrics in summary.items()},
        "per_seed": {arm: {seed: r.metrics for seed, r in by_seed.items()} for arm, by_seed in results.items()},
        "early_fd": {label: {step: list(value) for step, value in curve.items()} for label, curve in early.items()},
        "early_fd_per_seed": {
            arm: {seed: r.early_fd for seed, r in results.get(arm, {}).items()} for arm in ("stage1", "stage1_no_dyna")
        },
        "training_reward_curves": curves,
        "real_reference": real_reference,
        "claims": claims,
    }
    (figures_dir / "results.json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    if args.docs:
        write_report(Path(args.docs), figures_dir, settings, summary, early, claims, real_reference, seconds, machine)
    arms = [arm for arm in ARM_DESCRIPTIONS if arm in summary]
    print(metrics_table(summary, arms, real_reference))  # noqa: T201
    for claim in claims:
        print(f"{claim['verdict']:>13}: {claim['claim']}")  # noqa: T201
    print(f"reproduction outputs in {figures_dir} ({seconds['total'] / 60:.1f} min)")  # noqa: T201


if __name__ == "__main__":
    main()
