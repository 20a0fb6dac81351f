"""DMDRConfig: every knob of a DMDR run, documented, validated, loadable from YAML and the command line."""

import argparse
import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


FAMILIES = ("auto", "sdxl", "sd15", "sd3")


@dataclass
class DMDRConfig:
    r"""
    Configuration of a DMDR run (https://huggingface.co/papers/2511.13649). Every step count counts **generator
    updates**; the fake score is updated `update_ratio` times per generator update. Defaults are the released SD3-M /
    SDXL recipes; `examples/train_dmdr/configs/*.yaml` hold the per-model recipes.

    > Parameters that control the teacher and the student

    pretrained_model_name_or_path (`str`): the teacher, a diffusers pipeline folder or Hub id.
    family (`str`, defaults to `"auto"`): `sdxl`, `sd15`, `sd3`, or `auto` (read from `model_index.json`).
    num_student_steps (`int`, defaults to 4): sampling steps of the student, 1-8.
    student_timesteps (`list[float]`, *optional*): the student's timesteps in model units (SDXL 4-step
        `[999, 749, 499, 249]`); by default the family's grid (1-step SDXL: `[399]`; flow: shift-warped).
    shift (`float`, *optional*): shift of the flow-model grid (SD3-Medium 3, SD3.5-Large 5).
    training_mode (`str`, defaults to `"lora"`): `lora` trains a student adapter on the shared frozen base; `full`
        trains a full copy of the backbone.

    > Parameters of DMD, DynaDG, DynaRS and TTUR

    fake_score_lora_scale (`float`, defaults to 2.0): LoRA multiplier of the fake score.
    real_score_lora_scale (`float`, defaults to 0.5): DynaDG's initial multiplier of the fake LoRA in the real score.
    dynamic_steps (`int`, defaults to 2000): K, the generator updates over which DynaDG and DynaRS anneal; 0 disables.
    renoise_beta_alpha, renoise_beta_beta (`float`, defaults to 4.0 and 1.5): DynaRS Beta parameters at step 0.
    update_ratio (`int`, defaults to 5): fake-score updates per generator update.
    real_guidance_scale (`float`, defaults to 7.0): CFG scale of the real score; `guidance_scale_jitter` (0.5) draws
        it uniformly in `[scale - jitter, scale + jitter]` per generator update.
    backward_simulation (`str`, *optional*): `sde` (re-noise with fresh noise; SDXL default) or `ode` (deterministic;
        flow default). It also fixes whether the exported scheduler is deterministic.

    > Parameters of the two stages and the rewards

    cold_start_steps (`int`, defaults to 1500): stage 1 length (DMD only); rewards join from this generator step.
    reward (`list[str]`): rewards as `name[:weight][:key=value...]`, repeatable (`--reward clip:0.3`).
    reward_tilt (`bool`): in stage 1, weight each sample's DMD direction by its normalised reward (RT-DM).

    > Parameters of scale and memory

    gradient_accumulation_steps (`int`, defaults to 1): micro-batches of `train_batch_size` accumulated into each
        update of either network; a generator update and a fake-score update are each this many micro-batches.
    cache_prompt_embeds (`bool`): encode the prompt set once, cache the embeddings on the host and on disk
        (`prompt_embeds_cache_dir`, keyed by the teacher, the resolution and the prompts), keep text encoders off the GPU.
    offload_text_encoders (`bool`): keep the text encoders on the CPU between encodes (prompt sets too big to cache).
    memory_plan_num_processes (`int`, *optional*): the process count for which preflight's memory plan reports the
        per-process bytes under FSDP2 sharding (default: the launch's `WORLD_SIZE`, 1 without a launcher). The plan
        counts weights, gradients and optimizer states exactly from the component configs; activations are not in it.
    """

    # > Teacher and student
    pretrained_model_name_or_path: str = field(
        default=None, metadata={"help": "Teacher: a diffusers pipeline folder or a Hub model id.", "required": True}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the teacher, e.g. `fp16`."})
    family: Literal["auto", "sdxl", "sd15", "sd3"] = field(
        default="auto", metadata={"help": "Model family; `auto` reads `_class_name` from model_index.json."}
    )
    num_student_steps: int = field(default=4, metadata={"help": "Sampling steps of the student (1-8)."})
    student_timesteps: list[float] | None = field(
        default=None,
        metadata={"help": "Student timesteps in model units, noisiest first; default: the family's grid."},
    )
    shift: float | None = field(
        default=None, metadata={"help": "Shift of the flow-model student grid (SD3-M 3.0, SD3.5-L 5.0)."}
    )
    training_mode: Literal["lora", "full"] = field(
        default="lora", metadata={"help": "`lora`: a student adapter on the shared base; `full`: a full copy."}
    )
    lora_rank: int = field(default=64, metadata={"help": "Rank of the student LoRA."})
    lora_alpha: float | None = field(default=128, metadata={"help": "Alpha of the student LoRA (default 128)."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for the student LoRA; default per family."}
    )
    fake_lora_rank: int = field(default=32, metadata={"help": "Rank of the fake-score LoRA."})
    fake_lora_alpha: float | None = field(default=32, metadata={"help": "Alpha of the fake-score LoRA."})
    fake_lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for the fake-score LoRA; default per family."}
    )

    # > DMD, DynaDG, DynaRS, TTUR
    fake_score_lora_scale: float = field(default=2.0, metadata={"help": "LoRA multiplier of the fake score."})
    real_score_lora_scale: float = field(
        default=0.5, metadata={"help": "DynaDG: initial multiplier of the fake LoRA inside the real score."}
    )
    dynamic_steps: int = field(
        default=2000, metadata={"help": "K: generator updates over which DynaDG and DynaRS anneal (0 = off)."}
    )
    renoise_beta_alpha: float = field(default=4.0, metadata={"help": "DynaRS: Beta `a` at step 0."})
    renoise_beta_beta: float = field(default=1.5, metadata={"help": "DynaRS: Beta `b` at step 0."})
    update_ratio: int = field(default=5, metadata={"help": "Fake-score updates per generator update (TTUR)."})
    real_guidance_scale: float = field(default=7.0, metadata={"help": "CFG scale of the real score."})
    guidance_scale_jitter: float = field(
        default=0.5, metadata={"help": "Half-width of the uniform jitter on the real-score CFG scale."}
    )
    backward_simulation: Literal["sde", "ode"] | None = field(
        default=None, metadata={"help": "`sde` (fresh noise) or `ode` (deterministic); default per family."}
    )

    # > Stages and rewards
    cold_start_steps: int = field(
        default=1500, metadata={"help": "Stage 1 length in generator updates; rewards join after it."}
    )
    # Strings from the CLI, or mappings (`{name: clip, weight: 0.3, model: ...}`) from a YAML recipe.
    reward: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward `name[:weight][:key=value...]`, e.g. `clip:0.3:model=/path`; repeatable."},
    )
    eval_reward: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out rewards logged (never trained on) to watch for reward hacking; same syntax."},
    )
    reward_vae_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A diffusers `AutoencoderTiny` (e.g. madebyollin/taesdxl) that decodes x0 for the rewards: the "
            "released SDXL recipe's memory saver (full SDXL VAE decode with grad: +11.6 GiB; tiny: +1.5 GiB)."
        },
    )
    reward_tilt: bool = field(
        default=False, metadata={"help": "Stage 1: weight DMD per sample by the normalised reward (RT-DM)."}
    )
    reward_tilt_temperature: float = field(default=1.0, metadata={"help": "Temperature of the RT-DM softmax."})
    dmd_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the DMD loss; 0 gives reward-only training (ablation; the fake score then idles)."
        },
    )
    anchor_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an L2 anchor between the student's x0 and that of the student as it was when this run "
            "started (e.g. resumed from the stage-1 checkpoint): the KL-style regulariser DMDR compares DMD against."
        },
    )

    # > Data
    train_prompts: str = field(
        default=None,
        metadata={
            "help": "Prompts: a .txt (one per line), .json/.jsonl/.csv/.parquet, or a Hub dataset id.",
            "required": True,
        },
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column holding the prompts (default: `text` for .txt, else `prompt`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the prompt dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N prompts."})
    cache_prompt_embeds: bool = field(
        default=False,
        metadata={
            "help": "Encode every prompt (and the empty and validation prompts) once before training, keep the "
            "embeddings on the host and on disk for the next run, and keep the text encoders off the GPU."
        },
    )
    prompt_embeds_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the prompt-embedding cache (default: ~/.cache/diffusers_dmdr/prompt_embeds)."},
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "Keep the text encoders on the CPU and move them to the GPU only to encode a batch."},
    )
    resolution: int = field(default=1024, metadata={"help": "Square training resolution in pixels."})

    # > Optimisation
    max_train_steps: int = field(default=3000, metadata={"help": "Generator updates to train for."})
    train_batch_size: int = field(default=1, metadata={"help": "Prompts per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches accumulated into every update of both networks (effective batch per process = "
            "train_batch_size x this; the TTUR ratio still counts updates)."
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate of the student."})
    learning_rate_fake: float = field(default=5e-7, metadata={"help": "Learning rate of the fake score."})
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers LR schedule name."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warmup steps of both LR schedules."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of the student."})
    adam_weight_decay_fake: float = field(default=0.0, metadata={"help": "Weight decay of the fake score."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip of both networks."})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit for both optimizers."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    memory_plan_num_processes: int | None = field(
        default=None,
        metadata={
            "help": "Process count of the memory plan's FSDP2 column (per-process sharded bytes); default: this "
            "launch's WORLD_SIZE."
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Precision of frozen weights and autocast; default: accelerate's config."}
    )
    allow_tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    max_consecutive_nonfinite_steps: int = field(
        default=5, metadata={"help": "Abort after this many NaN/inf losses in a row (each one skips its step)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random draw (noise, timesteps, prompts, CFG)."})

    # > Logging, validation, checkpoints, export
    output_dir: str = field(default="dmdr-model", metadata={"help": "Where checkpoints, logs and the export go."})
    logging_dir: str = field(default="logs", metadata={"help": "Tracker folder, relative to output_dir."})
    report_to: str = field(default="tensorboard", metadata={"help": "`tensorboard`, `wandb`, `all` or `none`."})
    tracker_project_name: str = field(default="dmdr", metadata={"help": "Tracker project name."})
    validation_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts of the validation grids."})
    validation_steps: int = field(default=500, metadata={"help": "Log a validation grid every N generator steps."})
    num_validation_images: int = field(default=2, metadata={"help": "Images per validation prompt."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable state every N steps."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or `latest` in output_dir."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to the Hub (token from login)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub (org/name)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    export_full_pipeline: bool = field(
        default=True,
        metadata={
            "help": "In LoRA mode, also export the fused full pipeline, so that `DiffusionPipeline.from_pretrained("
            "repo, trust_remote_code=True)` works; `false` exports the LoRA alone (smaller, loads onto the teacher)."
        },
    )

    def __post_init__(self):
        self.student_timesteps = None if self.student_timesteps is None else [float(t) for t in self.student_timesteps]
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        if isinstance(self.eval_reward, str):
            self.eval_reward = [self.eval_reward]
        if isinstance(self.validation_prompts, str):
            self.validation_prompts = [self.validation_prompts]
        problems = []
        if not self.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (a teacher pipeline folder or Hub id).")
        if not self.train_prompts:
            problems.append("--train_prompts is required (a .txt/.json/.jsonl/.csv/.parquet file or a Hub dataset).")
        if self.family not in FAMILIES:
            problems.append(f"--family must be one of {FAMILIES}, got {self.family!r}.")
        if not 1 <= self.num_student_steps <= 8:
            problems.append(f"--num_student_steps must be between 1 and 8, got {self.num_student_steps}.")
        if self.student_timesteps is not None and len(self.student_timesteps) != self.num_student_steps:
            problems.append(
                f"--student_timesteps has {len(self.student_timesteps)} values but --num_student_steps is "
                f"{self.num_student_steps}: give one timestep per student step, or drop --student_timesteps."
            )
        for name in (
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "update_ratio",
            "lora_rank",
            "fake_lora_rank",
        ):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("cold_start_steps", "dynamic_steps", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be non-negative, got {getattr(self, name)}.")
        if self.cold_start_steps > self.max_train_steps:
            problems.append(
                f"--cold_start_steps ({self.cold_start_steps}) is longer than --max_train_steps "
                f"({self.max_train_steps}): stage 2 (DMD + rewards) would never run. Lower --cold_start_steps, or "
                "set it equal to --max_train_steps for a DMD-only run."
            )
        if self.renoise_beta_alpha <= 0 or self.renoise_beta_beta <= 0:
            problems.append("--renoise_beta_alpha and --renoise_beta_beta must be positive.")
        if self.guidance_scale_jitter < 0:
            problems.append("--guidance_scale_jitter must be non-negative.")
        if self.resolution < 8:
            problems.append(f"--resolution must be a positive multiple of the VAE factor, got {self.resolution}.")
        if self.memory_plan_num_processes is not None and self.memory_plan_num_processes < 1:
            problems.append(f"--memory_plan_num_processes must be at least 1, got {self.memory_plan_num_processes}.")
        if self.max_consecutive_nonfinite_steps < 1:
            problems.append("--max_consecutive_nonfinite_steps must be at least 1.")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("--push_to_hub needs --hub_model_id org/name.")
        if self.dmd_loss_weight < 0 or self.anchor_loss_weight < 0:
            problems.append("--dmd_loss_weight and --anchor_loss_weight must be non-negative.")
        if self.reward_tilt_temperature <= 0:
            problems.append("--reward_tilt_temperature must be positive.")
        if self.cache_prompt_embeds and self.offload_text_encoders:
            problems.append(
                "--cache_prompt_embeds already keeps the text encoders off the GPU; drop --offload_text_encoders."
            )
        if problems:
            raise ValueError("Invalid DMDR configuration:\n- " + "\n- ".join(problems))
        if self.reward and self.cold_start_steps == self.max_train_steps:
            warnings.warn(
                "Rewards are set but --cold_start_steps equals --max_train_steps: they will not be used.", stacklevel=2
            )
        if 0 < self.cold_start_steps < self.dynamic_steps and self.reward:
            warnings.warn(
                f"DynaDG/DynaRS anneal over {self.dynamic_steps} steps but stage 2 starts at {self.cold_start_steps}: "
                "the paper finishes the annealing within the cold start (set --dynamic_steps <= --cold_start_steps).",
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "DMDRConfig":
        return cls(**{**load_yaml_config(path), **overrides})

    @classmethod
    def parse_args(cls, argv: list[str] | None = None) -> "DMDRConfig":
        """Parse `argv` (default: `sys.argv`), with `--config recipe.yaml` supplying defaults the CLI overrides."""
        return cls(**vars(build_argument_parser().parse_args(argv)))


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML recipe and check its keys against the config fields (a typo must not be silently ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist.")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values.")
    known = {f.name for f in dataclasses.fields(DMDRConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} in {path}; see `train.py --help` for the option names.")
    for key in ("reward", "eval_reward"):
        specs = values.get(key) or []
        if not isinstance(specs, list) or not all(isinstance(spec, str | dict) for spec in specs):
            raise ValueError(f"`{key}` in {path} must be a list of `name:weight` strings or mappings with a `name`.")
    return values


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(kind):
    def convert(text: str):
        return None if str(text).lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__
    return convert


def build_argument_parser() -> argparse.ArgumentParser:
    """An argparse parser generated from the dataclass fields: help from metadata, choices from `Literal`."""
    parser = argparse.ArgumentParser(
        description="Distil a diffusers text-to-image teacher into a few-step student with DMDR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML recipe whose values become defaults.")
    hints = typing.get_type_hints(DMDRConfig)
    for spec in dataclasses.fields(DMDRConfig):
        kind = hints[spec.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)][0] if optional else kind
        kwargs = {"help": spec.metadata.get("help", ""), "dest": spec.name}
        if spec.default is not dataclasses.MISSING:
            kwargs["default"] = spec.default
        else:
            kwargs["default"] = spec.default_factory()
        if typing.get_origin(inner) is Literal:
            kwargs["choices"] = list(typing.get_args(inner))
            kwargs["type"] = str
        elif inner is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True)
        elif typing.get_origin(inner) is list:
            item_type = typing.get_args(inner)[0]
            if spec.name in ("reward", "eval_reward"):
                kwargs.update(action="append", type=str, default=None)
            else:
                kwargs.update(nargs="+", type=item_type)
        elif inner in (int, float, str):
            kwargs["type"] = _optional(inner) if optional else inner
        parser.add_argument(f"--{spec.name}", **kwargs)

    original_parse = parser.parse_args

    def parse_args(argv=None, namespace=None):
        # Two passes: read `--config` first so its values become defaults that explicit flags override.
        known_config = argparse.ArgumentParser(add_help=False)
        known_config.add_argument("--config", default=None)
        config_args, _ = known_config.parse_known_args(argv)
        if config_args.config:
            parser.set_defaults(**load_yaml_config(config_args.config))
        namespace = original_parse(argv, namespace)
        for name in ("reward", "eval_reward"):
            if getattr(namespace, name) is None:
                setattr(namespace, name, parser.get_default(name) or [])
        del namespace.config
        return namespace

    parser.parse_args = parse_args
    return parser
