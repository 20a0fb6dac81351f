"""DMDRConfig: every knob of a DMDR run, declared and documented once, validated, read from YAML and the command line.

The command line is `transformers.HfArgumentParser` over the dataclass. A `--config recipe.yaml` is read once; its
values fill the namespace before the flags are parsed, so explicit flags override the recipe. Whatever the source,
`DMDRConfig.__post_init__` coerces each value to its field's type (YAML reads `1e-4` as a string) and validates the
run, raising one `ValueError` that names the flag and the fix.
"""

import argparse
import dataclasses
import math
import re
import sys
import textwrap
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg, string_to_bool


# The `--family` choices. `diffusers_dmdr.families.FAMILIES` holds the same names without `auto`; the config sits
# below the families (it must not import torch or diffusers), so `tests/test_config.py` asserts that the two agree.
FAMILY_NAMES = ("auto", "sdxl", "sd15", "sd3", "flux", "flux2", "zimage", "qwenimage", "wan")
# The errors that config validation and the preflight checks raise for a bad input: `train.py` prints them as one
# message and exits with status 2. Any other exception is a bug and keeps its traceback.
USER_INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)
# `--lr_scheduler` choices: the names of diffusers' `SchedulerType` (the config imports no diffusers;
# `tests/test_config.py` asserts that the two agree).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
# `--report_to` trackers: accelerate's `LoggerType` values (asserted equal in `tests/test_config.py`); `all` (every
# installed one) and `none` stand alone, the others may be joined by commas (`tensorboard,wandb`).
TRACKERS = ("aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
# Flags of diffusers' training scripts that this command line does not take, and what to do instead: a user who
# types one gets the reason, not argparse's bare "unrecognized arguments".
DIFFUSERS_SCRIPT_FLAGS = {
    "--dataloader_num_workers": "prompts are drawn in the training process (no data loader, no images to load): "
    "drop the flag",
}
# `--help` sections: the first field of each, in the dataclass's field order (the docstring uses the same sections).
OPTION_GROUPS = {
    "pretrained_model_name_or_path": "Teacher and student",
    "fake_score_lora_scale": "Method (DMD, DynaDG, DynaRS, TTUR)",
    "cold_start_steps": "Stages and rewards",
    "train_prompts": "Prompt data",
    "max_train_steps": "Optimisation",
    "output_dir": "Logging, validation, checkpoints and export",
}
# Keys of a recipe's `stage2:` mapping and the config fields they set.
STAGE2_KEYS = {
    "learning_rate": "stage2_learning_rate",
    "learning_rate_fake": "stage2_learning_rate_fake",
    "train_batch_size": "stage2_train_batch_size",
}
# Options that no longer exist, and what replaced them (a recipe naming one gets this message, not "unknown option").
REPLACED_OPTIONS = {
    "reward_tilt_temperature": "RT-DM now z-scores the rewards within the batch; its one knob is "
    "`reward_tilt_strength` (a softmax temperature T on raw rewards corresponds to no fixed strength)",
}
# Fields only the command line may set (never saved into, nor read from, a recipe).
_COMMAND_LINE_ONLY = ("allow_reward_import_paths",)
# Reward lists: strings or mappings, validated by `rewards.parse_reward_spec` (not coerced here).
_SPEC_LIST_FIELDS = ("reward", "eval_reward")


def parse_bool(text: str) -> bool:
    """A boolean flag's value: transformers' `string_to_bool` words (`yes`/`no`, `true`/`false`, `t`/`f`, `y`/`n`,
    `1`/`0`) plus `on`/`off`, which this command line has always accepted."""
    if isinstance(text, str) and text.lower() in ("on", "off"):
        return text.lower() == "on"
    return string_to_bool(text)


class _CommandLineList(list):
    """A reward list built from command-line flags (as opposed to the recipe's list)."""


class ReplacingAppend(argparse.Action):
    """`--reward a --reward b`: the flags given on the command line *replace* the recipe's list; `none` clears it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if not isinstance(current, _CommandLineList):
            current = _CommandLineList()
        for value in values:
            if value.strip().lower() == "none":
                current.clear()
            else:
                current.append(value)
        setattr(namespace, self.dest, current)


@dataclass
class DMDRConfig:
    r"""
    Configuration of a DMDR run (https://huggingface.co/papers/2511.13649). Every step count counts **generator
    updates**; the fake score is updated `update_ratio` times per generator update. Defaults are the released SD3-M /
    SDXL recipes; `examples/train_dmdr/configs/*.yaml` hold the per-model recipes (their values are checked against
    the released scripts in `tests/data/released_recipes.yaml`). Each parameter is documented once, at its
    declaration (`--help` prints the same text); the list below is generated from the declarations.
    """

    pretrained_model_name_or_path: str = HfArg(
        default=None,
        help="Teacher: a diffusers pipeline folder or a Hub model id.",
    )
    revision: str | None = HfArg(default=None, help="Hub revision (branch, tag or commit) of the teacher.")
    variant: str | None = HfArg(default=None, help="Weight variant of the teacher's files, e.g. `fp16`.")
    pretrained_vae_model_name_or_path: str | None = HfArg(
        default=None,
        help="Another VAE for the teacher (a diffusers VAE folder or Hub id with `config.json` at its root, e.g. "
        "madebyollin/sdxl-vae-fp16-fix, which decodes SDXL's latents safely in fp16): it decodes the validation "
        "grids, the samples and (without `reward_vae_model_name_or_path`) the rewards' images, and the exported "
        "pipeline ships it. It must be the teacher VAE's class with the same latent space (channels, spatial factor, "
        "scaling and shift factors). As in diffusers' SDXL scripts, `revision` and `variant` apply to it too.",
    )
    cache_dir: str | None = HfArg(
        default=None,
        help="Hugging Face cache folder of every Hub read the run and its export make (teacher, VAE, rewards, reward "
        "autoencoder, a Hub prompt dataset); default: the Hugging Face cache (HF_HUB_CACHE).",
    )
    family: Literal[FAMILY_NAMES] = HfArg(
        default="auto",
        help="Model family: `sdxl`, `sd15`, `sd3`, `flux` (FLUX.1 [dev]), `flux2` (FLUX.2 [klein] base), `zimage` "
        "(`ZImagePipeline`), `qwenimage` (`QwenImagePipeline`), or `auto` (the `_class_name` of "
        "`model_index.json`).",
    )
    num_student_steps: int = HfArg(default=4, help="Sampling steps of the student (1-8).")
    student_timesteps: list[float] | None = HfArg(
        default=None,
        help="The student's timesteps in model units (SDXL 4-step `[999, 749, 499, 249]`); by default the family's "
        "grid (1-step SDXL: `[399]`; SD3: shift-warped; FLUX, Z-Image and Qwen-Image: the teacher scheduler's own "
        "schedule at `resolution`, with the resolution-dependent `mu` where the scheduler uses dynamic shifting, "
        "recorded in the exported scheduler config as `grid_mu`).",
    )
    shift: float | None = HfArg(
        default=None,
        help="Shift of the flow-model grid (SD3-Medium 3, SD3.5-Large 5); for FLUX, Z-Image and Qwen-Image a static "
        "shift that replaces the teacher scheduler's own shifting.",
    )
    training_mode: Literal["lora", "full"] = HfArg(
        default="lora",
        help="`lora` trains a student adapter on the shared frozen base; `full` trains a full copy of the backbone.",
    )
    lora_rank: int = HfArg(default=64, help="Rank of the student LoRA.")
    lora_alpha: float | None = HfArg(default=128, help="Alpha of the student LoRA.")
    lora_dropout: float = HfArg(
        default=0.0,
        help="Dropout on the student LoRA's input, in [0, 1) (PEFT's `lora_dropout`; the released recipes use none). "
        "The fake-score LoRA never drops out: it must track the student's distribution, and dropout would add noise "
        "to every DMD direction. Kept in the exported `adapter_config`.",
    )
    lora_target_modules: str | None = HfArg(
        default=None,
        help="Comma-separated module names for the student LoRA; default per family.",
    )
    fake_lora_rank: int = HfArg(default=32, help="Rank of the fake-score LoRA.")
    fake_lora_alpha: float | None = HfArg(default=32, help="Alpha of the fake-score LoRA.")
    fake_lora_target_modules: str | None = HfArg(
        default=None,
        help="Comma-separated module names for the fake-score LoRA; default per family.",
    )
    init_lora_weights: Literal["gaussian", "kaiming"] = HfArg(
        default="gaussian",
        help="Initialisation of both LoRAs' A matrices: `gaussian` (normal with std `1 / rank`, the released code's "
        "PEFT option) or `kaiming` (PEFT's default Kaiming-uniform, 2-6x smaller entries at the released ranks). "
        "B starts at zero either way.",
    )
    student_init_path: str | None = HfArg(
        default=None,
        help="Initialise the student only (teacher, real score and fake-score base stay the teacher): a backbone "
        "folder (`config.json` + safetensors, or a pipeline folder with `unet/` or `transformer/`) or a single "
        'backbone `.safetensors` file (both need `training_mode="full"`), or a PEFT LoRA `.safetensors` file '
        'loaded into the student adapter (`training_mode="lora"`). The released SDXL 1-step run starts from '
        "DMD2's ODE-regression UNet this way.",
    )
    fake_score_lora_scale: float = HfArg(default=2.0, help="LoRA multiplier of the fake score.")
    real_score_lora_scale: float = HfArg(
        default=0.5,
        help="DynaDG: initial multiplier of the fake LoRA inside the real score.",
    )
    dynamic_steps: int | None = HfArg(
        default=None,
        help="K, the generator updates over which DynaDG and DynaRS anneal; 0 disables. Unset, it equals "
        "`cold_start_steps` (the annealing ends with stage 1, as in the released recipes).",
    )
    renoise_beta_alpha: float = HfArg(
        default=4.0,
        help="DynaRS: Beta parameter `a` of the re-noising level at step 0.",
    )
    renoise_beta_beta: float = HfArg(default=1.5, help="DynaRS: Beta parameter `b` of the re-noising level at step 0.")
    update_ratio: int = HfArg(default=5, help="Fake-score updates per generator update (TTUR).")
    real_guidance_scale: float = HfArg(
        default=7.0,
        help="CFG scale of the real score, `uncond + w (cond - uncond)` with the family's negative prompt (empty; "
        'Qwen-Image: `" "`, its `true_cfg_scale`, with its per-token rescale); at a scale <= 1 there is no CFG '
        "and no jitter. Z-Image's own `guidance_scale` g is `w = 1 + g`.",
    )
    guidance_scale_jitter: float = HfArg(
        default=0.5,
        help="The scale is drawn uniformly in `[scale - jitter, scale + jitter]` per generator update.",
    )
    guidance_embedding_scale: float = HfArg(
        default=3.5,
        help="Guidance-distilled teachers only (FLUX.1 [dev]): the guidance embedding the student and the fake score "
        "run at (`FluxPipeline`'s default `guidance_scale`), stored in the export so that the exported pipeline "
        "samples at it. Their real score is one pass at embedding `real_guidance_scale` (jittered) instead of "
        "two-pass CFG. Ignored by the other families.",
    )
    fake_guidance_scale: float | None = HfArg(
        default=None,
        help="Guidance-distilled teachers only (FLUX.1 [dev]): the guidance embedding of the fake score, in its "
        "denoising loss and its DMD query; unset, `guidance_embedding_scale` (the student's). The released DMDR runs "
        "query the fake score without CFG and the real score with it, so at initialisation (fake = teacher) the DMD "
        "direction is the CFG term `x0(teacher, w) - x0(teacher, no CFG)`; the FLUX.1 recipe sets 1 (unguided) for "
        "that. Ignored by the other families.",
    )
    backward_simulation: Literal["sde", "ode"] | None = HfArg(
        default=None,
        help="`sde` (re-noise with fresh noise; SDXL default) or `ode` (deterministic; flow default). It also fixes "
        "whether the exported scheduler is deterministic.",
    )
    flow_x0_noise_level: float = HfArg(
        default=0.0,
        help="Flow models only: the clean estimate stops at this noise level, `x0 = x_t + (level - t) v`; the released "
        "T2I code uses 0.001. The velocity term is then `(t - level) / t` of the exact one: the estimate is the point "
        "at noise `level` on the flow line, `(1 - level) x0 + level noise`, and every DMD direction is scaled by "
        "`(t - level) / t`. Kept in the exported scheduler.",
    )
    released_bf16_grid: bool = HfArg(
        default=False,
        help="SD3 only: compute every time value as the released DMDR code did, in bf16: the student grid (SD3-Medium "
        "4 steps: the model sees `[1000, 900, 752, 504]`, SD3.5-Large `[1000, 936, 832, 628]`, instead of the nominal "
        "float32 `[1000, 900.1, 750.4, 501.0]` / `[1000, 937.6, 833.6, 625.9]`) and every re-noise level (rounded by "
        "up to 0.002 in t). Kept in the exported scheduler (`time_dtype`). Only to reproduce released runs exactly.",
    )
    cold_start_steps: int | None = HfArg(
        default=None,
        help="Stage 1 length (DMD only); rewards join from this generator step. Unset, it is half of "
        "`max_train_steps`.",
    )
    stage2_learning_rate: float | None = HfArg(
        default=None,
        help="Student learning rate from `cold_start_steps` on (within one run, and on a resume past it); unset keeps "
        "stage 1's. In YAML also as a `stage2:` mapping (`stage2: {learning_rate: 5.0e-7, learning_rate_fake: "
        "2.0e-7, train_batch_size: 1}`).",
    )
    stage2_learning_rate_fake: float | None = HfArg(
        default=None,
        help="Fake-score learning rate from `cold_start_steps` on; unset keeps stage 1's (YAML: "
        "`stage2.learning_rate_fake`).",
    )
    stage2_train_batch_size: int | None = HfArg(
        default=None,
        help="Prompts per process per iteration in stage 2 (the released scripts halve it); unset keeps "
        "`train_batch_size` (YAML: `stage2.train_batch_size`).",
    )
    reward: list[str] = HfArg(
        default_factory=list,
        metadata={"action": ReplacingAppend},
        help="Rewards as `name[:weight][:key=value...]` (e.g. `clip:0.3:model=/path`), repeatable; in YAML strings or "
        "mappings (`{name: clip, weight: 0.3}`). Given on the command line, the flags replace a recipe's list; "
        "`--reward none` clears it.",
    )
    eval_reward: list[str] = HfArg(
        default_factory=list,
        metadata={"action": ReplacingAppend},
        help="Held-out rewards, logged and never trained on (reward-hacking monitor); same syntax as `reward`.",
    )
    reward_vae_model_name_or_path: str | None = HfArg(
        default=None,
        help="A diffusers `AutoencoderTiny` (e.g. madebyollin/taesdxl) that decodes x0 for the rewards: the released "
        "SDXL recipe's memory saver (full SDXL VAE decode with grad: +11.6 GiB; tiny: +1.5 GiB).",
    )
    reward_vae_revision: str | None = HfArg(
        default=None,
        help="Hub revision of that autoencoder (the teacher's `revision` is not used).",
    )
    reward_vae_gradient_checkpointing: bool = HfArg(
        default=False,
        help="Checkpoint the reward decoder's blocks (diffusers' `enable_gradient_checkpointing` of the autoencoder): "
        "the reward backward recomputes the decode instead of keeping its activations (SDXL's full VAE at 1024 px: "
        "about 5 GiB less, one more decode of compute). Autoencoders without diffusers checkpointing support "
        "(Qwen-Image's, Wan's) are refused.",
    )
    reward_vae_tile_size: int | None = HfArg(
        default=None,
        help="Decode the rewards' images in tiles of this many pixels (diffusers' tiled decode of the teacher's "
        "AutoencoderKL / AutoencoderKLFlux2, tiles overlapping by a quarter and blended). With "
        "--reward_vae_gradient_checkpointing the recomputed decode is one tile at a time: SDXL's VAE at 1024 px with "
        "512 px tiles holds 3.0 GiB instead of 6.1. The images differ from an untiled decode where tiles blend. "
        "Validation and export decodes stay untiled.",
    )
    cache_reward_text_features: bool = HfArg(
        default=False,
        help="Embed each training prompt once with every CLIP-style reward (clip, hpsv2, hpsv2.1, pickscore), keep the "
        "normalised text features on the host and delete the rewards' text towers (ViT-H/14: 0.66 GiB each in "
        "bf16). Rewards without a text tower, or whose prompts change per step (relative), are left as they are.",
    )
    sequential_reward_backward: bool = HfArg(
        default=False,
        help="Back-propagate each reward's loss to the decoded images as soon as it is scored, then the images' "
        "gradient through the student once: one reward tower's activations on the device at a time (with a reward's "
        "`offload=true`, also one tower's weights) instead of all of them at the generator's backward. Same gradients. "
        "Not with fp16 autocast (the towers' backward would run without the loss scaler): use bf16.",
    )
    reward_tilt: bool = HfArg(
        default=False,
        help="In stage 1, weight each sample's DMD direction by its reward (RT-DM, paper v4): the weighted sum of the "
        "`reward` scores of the full few-step samples, z-scored within each micro-batch, weights "
        "`B * softmax(reward_tilt_strength * z)` (mean 1, independent of the rewards' scale). Needs "
        "`train_batch_size >= 2` (the micro-batch the rewards are normalised over).",
    )
    reward_tilt_strength: float = HfArg(
        default=0.5,
        help="RT-DM tilt strength `s`: a sample one batch-std above the batch's mean reward gets about `e^s` times the "
        "weight of one at the mean; 0 is plain DMD.",
    )
    allow_reward_import_paths: bool = HfArg(
        default=False,
        help="Let a YAML recipe name rewards (or a classifier's `module`) by import path `pkg.module.Attr`. Importing "
        "runs the module's code, so a recipe file (which may be downloaded) cannot opt in itself: pass "
        "`--allow_reward_import_paths` on the command line. Import paths typed on the command line need no "
        "opt-in. Either way the path must resolve to a reward class or function.",
    )
    dmd_loss_weight: float = HfArg(
        default=1.0,
        help="Weight of the DMD loss; 0 gives reward-only training (ablation; the fake score then idles).",
    )
    anchor_loss_weight: float = HfArg(
        default=0.0,
        help="Weight of an L2 anchor between the student's x0 and that of the student as it was when this run started "
        "(e.g. resumed from the stage-1 checkpoint): the KL-style regulariser DMDR compares DMD against.",
    )
    rl: Literal["refl", "grpo", "dpo"] = HfArg(
        default="refl",
        help="The RL algorithm of stage 2 (`method/registry.py`): `refl` back-propagates differentiable rewards (the "
        "paper's default); `grpo` (group-relative policy optimisation on the student's own stochastic sampler) and "
        "`dpo` (Diffusion-DPO on the best and worst of each group) need only scores, so any reward works, including "
        "ones without gradients (`remote`, scikit-learn models, OCR, judges). docs/rl.md says which to pick.",
    )
    rl_weight: float = HfArg(
        default=1.0, help="GRPO / DPO: the weight lambda of the RL loss in `L_DMD + lambda L_RL`."
    )
    rl_group_size: int = HfArg(
        default=4,
        help="GRPO / DPO: rollouts per prompt (a group: one prompt, G noises). --train_batch_size (rows per "
        "micro-batch) must be a multiple of G, so groups are never split across micro-batches or processes.",
    )
    rl_regularizer: Literal["dmd", "kl", "none"] = HfArg(
        default="dmd",
        help="GRPO / DPO: what keeps the student near the data in stage 2: `dmd` (DMDR: the DMD loss), `kl` (GRPO "
        "only: Flow-GRPO's KL to the stage-1 student, weight --rl_kl_weight) or `none`.",
    )
    rl_kl_weight: float = HfArg(
        default=0.04, help="GRPO with --rl_regularizer kl: the KL weight (Flow-GRPO's beta, 0.04)."
    )
    rl_clip_range: float = HfArg(
        default=1e-4, help="GRPO: the PPO clip range on the per-element log-probability ratio (Flow-GRPO: 1e-4)."
    )
    rl_advantage_clip: float = HfArg(
        default=5.0, help="GRPO: advantages are clamped to [-c, c] (Flow-GRPO, DanceGRPO: 5)."
    )
    rl_inner_epochs: int = HfArg(
        default=1,
        help="GRPO / DPO: generator optimizer steps on each stage-2 rollout batch (Flow-GRPO's `num_inner_epochs`). "
        "With 1 the PPO ratio is 1 and the clip never acts; with 2 or more the later steps train the same rollouts "
        "under the updated student, so the ratio moves off 1 and --rl_clip_range bounds it. A generator step "
        "(--max_train_steps counts them) then makes this many optimizer steps of the student for one rollout.",
    )
    rl_transitions: Literal["drawn", "all"] = HfArg(
        default="drawn",
        help="GRPO: which transitions of each rollout the policy loss trains. `drawn`: one per row, at the row's "
        "drawn student step (the step its DMD term trains; a row drawn at the last step, which has no stochastic "
        "transition, trains DMD only). `all`: every stochastic transition of every row (Flow-GRPO trains the whole "
        "trajectory): N - 1 times the policy signal per rollout, for N - 1 more student forward+backward passes per "
        "row, whose graphs are held together (enable gradient checkpointing at scale).",
    )
    rl_noise_level: float = HfArg(
        default=0.7,
        help="GRPO / DPO with an `ode` student: the share of fresh noise per step, eta in (0, 1] (coefficients-"
        "preserving sampling; Flow-GRPO's default 0.7). `sde` students explore with their own sampler (eta = 1).",
    )
    rl_dpo_beta: float = HfArg(
        default=100.0,
        help="DPO: the inverse temperature beta of Diffusion-DPO on per-element mean x0 errors (docs/rl.md says how "
        "it was chosen).",
    )
    train_prompts: str = HfArg(
        default=None,
        help="A .txt (one prompt per line), .json/.jsonl/.csv/.parquet file, or a Hub dataset id.",
    )
    prompt_column: str | None = HfArg(
        default=None,
        help="Column holding the prompts (default: `text` for .txt, else `prompt`).",
    )
    dataset_config_name: str | None = HfArg(default=None, help="Config of a Hub dataset.")
    dataset_split: str = HfArg(default="train", help="Split of the prompt dataset.")
    max_train_samples: int | None = HfArg(default=None, help="Keep only the first N prompts.")
    cache_prompt_embeds: bool = HfArg(
        default=False,
        help="Encode the prompt set once, cache the embeddings on the host and on disk (`prompt_embeds_cache_dir`, "
        "keyed by the teacher, the resolution and the prompts), keep text encoders off the GPU.",
    )
    prompt_embeds_cache_dir: str | None = HfArg(
        default=None,
        help="Folder of the prompt-embedding cache (default: ~/.cache/diffusers_dmdr/prompt_embeds).",
    )
    offload_text_encoders: bool = HfArg(
        default=False,
        help="Keep the text encoders on the CPU and move them to the GPU only to encode a batch.",
    )
    resolution: int = HfArg(
        default=1024,
        help="Square training resolution in pixels (the height when `width` is set).",
    )
    width: int | None = HfArg(
        default=None,
        help="Training width in pixels for non-square images (e.g. `--resolution 32 --width 64`); defaults to "
        "`resolution`.",
    )
    num_frames: int | None = HfArg(
        default=None,
        help="Video frames per training sample (video teachers: wan; default 81, the stock WanPipeline's). "
        "`num_frames - 1` must be divisible by the VAE's temporal factor (4): 81, 49, 33, 17, ...",
    )
    reward_frames: list[int] | None = HfArg(
        default=None,
        help="Video teachers: the decoded frames an image reward scores (indices, negative from the end, e.g. "
        "`0 40 -1`); the reward is the mean over them. Default: every frame. Whole-clip rewards see every frame.",
    )
    max_train_steps: int = HfArg(default=3000, help="Generator updates to train for (both stages).")
    train_batch_size: int = HfArg(
        default=1,
        help="Prompts per process per iteration in stage 1. The global batch is `train_batch_size x processes`.",
    )
    gradient_accumulation_steps: int = HfArg(
        default=1,
        help="Micro-batches of `train_batch_size` accumulated into each update of either network; a generator update "
        "and a fake-score update are each this many micro-batches.",
    )
    learning_rate: float = HfArg(default=1e-6, help="Learning rate of the student (stage 1).")
    learning_rate_fake: float = HfArg(default=5e-7, help="Learning rate of the fake score (stage 1).")
    lr_scheduler: str = HfArg(default="constant", help="A diffusers LR schedule name (both networks).")
    lr_warmup_steps: int = HfArg(default=0, help="Warmup of both schedules, in generator updates.")
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1 (both networks).")
    adam_beta2: float = HfArg(default=0.999, help="AdamW beta2 (both networks).")
    adam_weight_decay: float = HfArg(default=1e-2, help="Weight decay of the student.")
    adam_weight_decay_fake: float = HfArg(default=0.0, help="Weight decay of the fake score.")
    adam_epsilon: float = HfArg(default=1e-8, help="AdamW epsilon (both networks).")
    max_grad_norm: float = HfArg(default=1.0, help="Gradient-norm clip of both networks.")
    use_8bit_adam: bool = HfArg(
        default=False,
        help="Bitsandbytes AdamW8bit for both networks (the released T2I scripts).",
    )
    gradient_checkpointing: bool = HfArg(default=False, help="Trade compute for activation memory.")
    base_quantization: Literal["none", "bnb_int8", "bnb_nf4", "torchao_int8"] = HfArg(
        default="none",
        help="Load the frozen base (the teacher, under the student and fake-score LoRAs) quantized through diffusers' "
        "own backends, QLoRA-style: `bnb_int8` / `bnb_nf4` (bitsandbytes, CUDA only; `pip install "
        "diffusers-dmdr[bnb]`), `torchao_int8` (torchao int8 weight-only, also on the CPU; `pip install "
        "diffusers-dmdr[quant]`). Only `nn.Linear` weights of the backbone are quantized; the LoRA adapters train in "
        "float32, so the exported LoRA applies to the stock, unquantized teacher. The teacher is then the quantized "
        "base (see docs/benchmarks.md, 'Quantized base on the digits testbed'). LoRA mode only, not with FSDP2.",
    )
    memory_plan_num_processes: int | None = HfArg(
        default=None,
        help="The process count for which preflight's memory plan reports the per-process bytes under FSDP2 sharding "
        "(default: the launch's `WORLD_SIZE`, 1 without a launcher). The plan counts weights, gradients and "
        "optimizer states exactly from the component configs; activations are not in it.",
    )
    max_memory_gib: float | None = HfArg(
        default=None,
        help="GPU memory per process (GiB) the run must fit in. Preflight then estimates a whole iteration, activations "
        "included (`memory_estimate.check_memory_budget`: fake tensors, no weights), and refuses a run over it, naming "
        "the cheapest options that would fit.",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = HfArg(
        default=None,
        help="`no`, `fp16` or `bf16`: dtype of the frozen weights (teacher, encoders, rewards) and of autocast; "
        "default: accelerate's config.",
    )
    allow_tf32: bool = HfArg(
        default=False,
        help="Allow TF32 matmuls and convolutions on Ampere+ GPUs (the GPU recipes turn it on).",
    )
    max_consecutive_nonfinite_steps: int = HfArg(
        default=5,
        help="Abort after this many NaN/inf losses in a row (each one skips its step).",
    )
    divergence_loss_factor: float = HfArg(
        default=100.0,
        help="The run stops when a generator or fake-score loss exceeds this many times its running reference "
        "(`guards.DivergenceGuard`); 0 disables the loss rule.",
    )
    divergence_weight_norm_factor: float = HfArg(
        default=10.0,
        help="The run stops when the norm of the trainable weights exceeds this many times its value at the start of "
        "the run; 0 disables the weight rule.",
    )
    divergence_warmup_steps: int = HfArg(
        default=5,
        help="Healthy generator steps that build the loss reference before the loss rule applies.",
    )
    seed: int = HfArg(default=0, help="Seed of every random draw (noise, timesteps, prompts, CFG, control words).")
    output_dir: str = HfArg(default="dmdr-model", help="Where checkpoints, logs and the export go.")
    logging_dir: str = HfArg(default="logs", help="Tracker folder, relative to `output_dir`.")
    report_to: str = HfArg(
        default="tensorboard",
        help="Tracker(s): `tensorboard`, `wandb`, `comet_ml`, `mlflow`, ... (accelerate's names), several joined by "
        "commas (`tensorboard,wandb`), `all` (every installed one) or `none`.",
    )
    tracker_project_name: str = HfArg(default="dmdr", help="Tracker project name.")
    validation_prompts: list[str] | None = HfArg(
        default=None,
        help="Prompts of the validation grids, the export's `samples.png` and the card's samples; unset, a few "
        "training prompts are sampled.",
    )
    validation_steps: int = HfArg(default=500, help="Log a validation grid every N generator steps (0: at the end).")
    num_validation_images: int = HfArg(default=2, help="Images per validation prompt (at least 1).")
    checkpointing_steps: int = HfArg(
        default=500, help="Save a resumable state every N generator steps (0: no checkpoints)."
    )
    checkpoints_total_limit: int | None = HfArg(
        default=None,
        help="Keep the newest N >= 1 complete checkpoints; unset keeps all.",
    )
    resume_from_checkpoint: str | None = HfArg(default=None, help="A checkpoint folder, or `latest` in `output_dir`.")
    push_to_hub: bool = HfArg(default=False, help="Upload the export to the Hub (token from `huggingface-cli login`).")
    hub_model_id: str | None = HfArg(default=None, help="Repo id for --push_to_hub (org/name).")
    hub_private: bool = HfArg(default=False, help="Create the Hub repo as private.")
    hub_timeout: float = HfArg(
        default=90.0,
        help="Seconds a Hub request of the export may take (each call, its retries included); a dead or hanging Hub "
        "then fails with the command that retries the upload.",
    )
    export_full_pipeline: bool = HfArg(
        default=True,
        help="In LoRA mode, also export the fused full pipeline, so that `DiffusionPipeline.from_pretrained(repo, "
        "trust_remote_code=True)` works; `false` exports the LoRA alone (smaller, loads onto the teacher).",
    )
    base_model: str | None = HfArg(
        default=None,
        help="The teacher's Hub id (`org/name`) when `pretrained_model_name_or_path` is a local copy: the exported "
        "card's `base_model` and its snippets name it. Unset for a local teacher, the card says so and its "
        "snippets carry a placeholder (the export warns).",
    )
    recipe_reward_lists: dict[str, str] = HfArg(
        default_factory=dict,
        init=False,
        help="Set by `parse_args` and `from_yaml`, never by a flag or a recipe: the reward lists (`reward`, "
        "`eval_reward`) that came from a recipe file, and that file. The preflight "
        "(`rewards.check_recipe_import_paths`) refuses their import paths without `allow_reward_import_paths`.",
    )

    def __post_init__(self):
        for name in ("reward", "eval_reward", "validation_prompts"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        problems = []
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if not spec.init or spec.name in _SPEC_LIST_FIELDS or (value is None and spec.default is None):
                continue
            try:
                setattr(self, spec.name, _coerce(value, hints[spec.name]))
            except TypeError as error:
                problems.append(f"--{spec.name} must be {error}, got {value!r} ({type(value).__name__}).")
        if problems:
            raise ValueError("Invalid DMDR configuration:\n- " + "\n- ".join(problems))
        # Unset stage lengths follow the run's length: half the run in stage 1, annealing within stage 1. A resume
        # keeps the checkpoint's values of these derived fields (`preflight.check_resume_recipe`).
        self.derived_fields = {name for name in ("cold_start_steps", "dynamic_steps") if getattr(self, name) is None}
        if self.cold_start_steps is None:
            self.cold_start_steps = self.max_train_steps // 2
        if self.dynamic_steps is None:
            self.dynamic_steps = self.cold_start_steps
        problems = []
        if not self.pretrained_model_name_or_path:
            problems.append("--pretrained_model_name_or_path is required (a teacher pipeline folder or Hub id).")
        if not self.train_prompts:
            problems.append("--train_prompts is required (a .txt/.json/.jsonl/.csv/.parquet file or a Hub dataset).")
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
        for name in ("stage2_learning_rate", "stage2_learning_rate_fake", "stage2_train_batch_size"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                problems.append(
                    f"--{name} must be positive and finite, got {value}; leave it unset to keep the stage-1 value."
                )
        if self.shift is not None and (not math.isfinite(self.shift) or self.shift <= 0):
            problems.append(
                f"--shift must be a positive finite number (SD3-Medium 3, SD3.5-Large 5), got {self.shift}."
            )
        if not (math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            problems.append(f"--lora_dropout must be in [0, 1) (0: no dropout), got {self.lora_dropout}.")
        elif self.lora_dropout > 0 and self.training_mode == "full":
            problems.append(
                "--lora_dropout applies to the student LoRA and --training_mode full trains no student LoRA: drop "
                "--lora_dropout, or use --training_mode lora."
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        for name in ("num_validation_images", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name} must be at least 1, got {value}.")
        for name in ("checkpointing_steps", "validation_steps"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 (off) or a positive number of steps, got {getattr(self, name)}.")
        problems += _report_to_problems(self.report_to)
        if self.hub_model_id is not None:
            problems += hub_model_id_problems(self.hub_model_id)
        if self.flow_x0_noise_level < 0 or self.flow_x0_noise_level >= 0.1:
            problems.append(f"--flow_x0_noise_level must be in [0, 0.1), got {self.flow_x0_noise_level}.")
        if self.renoise_beta_alpha <= 0 or self.renoise_beta_beta <= 0:
            problems.append("--renoise_beta_alpha and --renoise_beta_beta must be positive.")
        if self.guidance_scale_jitter < 0:
            problems.append("--guidance_scale_jitter must be non-negative.")
        if not math.isfinite(self.guidance_embedding_scale) or self.guidance_embedding_scale < 0:
            problems.append(
                f"--guidance_embedding_scale must be a non-negative number (FLUX.1 [dev] default 3.5), got "
                f"{self.guidance_embedding_scale}."
            )
        if self.fake_guidance_scale is not None and (
            not math.isfinite(self.fake_guidance_scale) or self.fake_guidance_scale < 0
        ):
            problems.append(
                f"--fake_guidance_scale must be a non-negative number (FLUX.1 [dev]: 1 is unguided), got "
                f"{self.fake_guidance_scale}."
            )
        if self.num_frames is not None and self.num_frames < 1:
            problems.append(f"--num_frames must be at least 1, got {self.num_frames}.")
        if self.reward_frames is not None and not self.reward_frames:
            problems.append("--reward_frames needs at least one frame index (or drop it for every frame).")
        if self.resolution < 8:
            problems.append(f"--resolution must be a positive multiple of the VAE factor, got {self.resolution}.")
        if self.width is not None and self.width < 8:
            problems.append(f"--width must be a positive multiple of the VAE factor, got {self.width}.")
        if self.max_memory_gib is not None and not self.max_memory_gib > 0:
            problems.append(f"--max_memory_gib must be positive, got {self.max_memory_gib}.")
        if self.memory_plan_num_processes is not None and self.memory_plan_num_processes < 1:
            problems.append(f"--memory_plan_num_processes must be at least 1, got {self.memory_plan_num_processes}.")
        if self.max_consecutive_nonfinite_steps < 1:
            problems.append("--max_consecutive_nonfinite_steps must be at least 1.")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("--push_to_hub needs --hub_model_id org/name.")
        if self.base_model is not None and (Path(self.base_model).expanduser().exists() or "/" not in self.base_model):
            problems.append(
                f"--base_model {self.base_model} must be the teacher's Hub id (org/name), not a local folder."
            )
        if self.dmd_loss_weight < 0 or self.anchor_loss_weight < 0:
            problems.append("--dmd_loss_weight and --anchor_loss_weight must be non-negative.")
        if self.sequential_reward_backward and self.mixed_precision == "fp16":
            problems.append(
                "--sequential_reward_backward runs the reward towers' backward outside fp16's loss scaling, where "
                "their small gradients underflow: use --mixed_precision bf16 (or no), or drop "
                "--sequential_reward_backward."
            )
        if not math.isfinite(self.reward_tilt_strength) or self.reward_tilt_strength < 0:
            problems.append(f"--reward_tilt_strength must be a non-negative number, got {self.reward_tilt_strength}.")
        if self.rl != "refl":
            problems += self._rl_problems()
        for name in ("learning_rate", "learning_rate_fake"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                problems.append(f"--{name} must be a positive finite number (e.g. 1e-6), got {value}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append(
                f"--checkpoints_total_limit must be at least 1 (the newest N complete checkpoints are kept), got "
                f"{self.checkpoints_total_limit}; drop the flag to keep every checkpoint."
            )
        if self.guidance_scale_jitter > self.real_guidance_scale:
            problems.append(
                f"--guidance_scale_jitter {self.guidance_scale_jitter} is larger than --real_guidance_scale "
                f"{self.real_guidance_scale}: the drawn CFG scale could be negative. Use a jitter <= the scale."
            )
        for name in ("divergence_loss_factor", "divergence_weight_norm_factor"):
            value = getattr(self, name)
            if not math.isfinite(value) or (value != 0 and value <= 1):
                problems.append(f"--{name} must be 0 (off) or a finite factor above 1, got {value}.")
        if self.divergence_warmup_steps < 1:
            problems.append("--divergence_warmup_steps must be at least 1.")
        if not math.isfinite(self.hub_timeout) or self.hub_timeout <= 0:
            problems.append(f"--hub_timeout must be a positive number of seconds, got {self.hub_timeout}.")
        if len(problems) == 1:
            raise ValueError(f"Invalid DMDR configuration: {problems[0]}")
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

    def _rl_problems(self) -> list[str]:
        """What GRPO and DPO need beyond the rest of the config."""
        problems = []
        if self.rl_group_size < 2:
            problems.append(
                f"--rl_group_size must be at least 2 (a group compares its rollouts), got {self.rl_group_size}."
            )
        for name in ("train_batch_size", "stage2_train_batch_size"):
            value = getattr(self, name)
            if value is not None and self.rl_group_size >= 2 and value % self.rl_group_size:
                problems.append(
                    f"--{name} {value} (rows per micro-batch) is not a multiple of --rl_group_size "
                    f"{self.rl_group_size}: --rl {self.rl} keeps each group of rollouts whole within a micro-batch."
                )
        if self.num_student_steps < 2:
            problems.append(
                f"--rl {self.rl} needs at least 2 student steps: a 1-step sampler has no stochastic transition."
            )
        if self.rl == "dpo" and self.rl_regularizer == "kl":
            problems.append("--rl dpo has its reference built in: use --rl_regularizer dmd or none.")
        if self.rl == "dpo" and self.rl_transitions != "drawn":
            problems.append(
                "--rl_transitions all is GRPO's (DPO compares x0 errors of a pair, not transitions): drop it for --rl dpo."
            )
        for name in ("rl_weight", "rl_kl_weight", "rl_clip_range", "rl_advantage_clip", "rl_dpo_beta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                problems.append(f"--{name} must be a positive finite number, got {value}.")
        if not 0 < self.rl_noise_level <= 1:
            problems.append(f"--rl_noise_level must be in (0, 1], got {self.rl_noise_level}.")
        if self.rl_inner_epochs < 1:
            problems.append(f"--rl_inner_epochs must be at least 1, got {self.rl_inner_epochs}.")
        return problems

    def to_dict(self) -> dict:
        """The run's values (the recipe provenance left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "recipe_reward_lists"}

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the training images: `resolution` for both unless `width` is set."""
        return self.resolution, self.width or self.resolution

    @property
    def conditioning_size(self) -> int | tuple[int, int]:
        """The size handed to `family.encode_prompts`: `resolution` when square, else `(height, width)`."""
        height, width = self.image_size
        return height if height == width else (height, width)

    def save_yaml(self, path: str | Path) -> None:
        """Write the config as a recipe; the import-path opt-in is a permission of one command line, not a value a
        recipe may carry (`load_yaml_config` refuses it), so it is left out."""
        values = {k: v for k, v in self.to_dict().items() if k not in _COMMAND_LINE_ONLY}
        Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "DMDRConfig":
        """The recipe at `path` with `overrides` on top; the preflight refuses the recipe's import-path rewards unless
        `allow_reward_import_paths=True` is among the overrides."""
        values = load_yaml_config(path)
        config = cls(**{**values, **overrides})
        config.recipe_reward_lists = {
            key: str(path) for key in _SPEC_LIST_FIELDS if key in values and key not in overrides
        }
        return config

    @classmethod
    def parse_args(
        cls, argv: list[str] | None = None, epilog: str | None = None, prog: str | None = None
    ) -> "DMDRConfig":
        """Parse `argv` (default: `sys.argv`), with `--config recipe.yaml` supplying values the flags override;
        `epilog` is printed at the end of `--help`, whose usage line names `prog`."""
        argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
        for token in argv:
            flag = token.split("=", 1)[0]
            if flag in DIFFUSERS_SCRIPT_FLAGS:
                raise ValueError(
                    f"{flag} is a flag of diffusers' training scripts that DMDR does not take: "
                    f"{DIFFUSERS_SCRIPT_FLAGS[flag]}."
                )
        recipe_path = _recipe_path(argv)
        recipe = load_yaml_config(recipe_path) if recipe_path else {}
        # argparse sets a default only where the namespace has no value yet, and converts only its own string
        # defaults: the recipe's values stay as read, for `__post_init__` to coerce with the project's messages.
        namespace = vars(build_argument_parser(epilog, prog).parse_args(argv, argparse.Namespace(**recipe)))
        del namespace["config"]
        from_recipe = {
            key: recipe_path for key in _SPEC_LIST_FIELDS if key in recipe and namespace[key] is recipe[key]
        }
        config = cls(**{**namespace, **{key: list(namespace[key] or []) for key in _SPEC_LIST_FIELDS}})
        config.recipe_reward_lists = from_recipe
        return config


def report_to_trackers(report_to: str) -> list[str]:
    """`--report_to` as the tracker names it lists (`[]` for `none`)."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names


def _report_to_problems(report_to: str) -> list[str]:
    names = report_to_trackers(report_to)
    if report_to.strip() != "none" and not names:
        return [f"--report_to is empty; give a tracker ({', '.join(TRACKERS)}), `all` or `none`."]
    unknown = [name for name in names if name not in TRACKERS + ("all",)]
    if unknown:
        return [
            f"--report_to {report_to}: unknown tracker(s) {unknown}; use {', '.join(TRACKERS)} (several joined by "
            "commas), `all` or `none`."
        ]
    if len(names) > 1 and "all" in names:
        return [f"--report_to {report_to}: `all` already means every installed tracker; give it alone."]
    return []


def hub_model_id_problems(hub_model_id: str) -> list[str]:
    """A repo id the Hub accepts (`org/name`): checked before the run, not after it, when the push fails."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as error:
        reason = " ".join(str(error).split())
        return [f"--hub_model_id {hub_model_id!r} is not a valid Hub repo id ({reason}); use e.g. org/model-name."]
    return []


def _coerce(value, hint):
    """`value` as the field type `hint`, or raise `TypeError` naming what was expected. Strings convert as on the
    command line (YAML reads `1e-4` and quoted values as strings); `none`/`null` is None where the field allows it."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in args:
            raise TypeError(f"one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TypeError(f"a list of {args[0].__name__}")
        return [_coerce(item, args[0]) for item in value]
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
    if isinstance(value, str) and hint is not str:
        try:
            return parse_bool(value) if hint is bool else hint(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise TypeError(expected) from None
    if isinstance(value, bool) != (hint is bool):
        raise TypeError(expected)  # `True` is no number, `1` no boolean.
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) and not (hint is float and isinstance(value, int)):
        raise TypeError(expected)
    return hint(value)


def _document_fields(cls: type) -> None:
    """Append one entry per field (type, default, help) to `cls.__doc__`, in the `--help` sections: the help text in
    `field(metadata=...)` is the only copy of each field's documentation."""
    hints, lines = typing.get_type_hints(cls), []
    for spec in dataclasses.fields(cls):
        if spec.name in OPTION_GROUPS:
            lines += ["", f"    > {OPTION_GROUPS[spec.name]}", ""]
        hint = hints[spec.name]
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        kind = inner[0] if type(None) in typing.get_args(hint) else hint
        origin = typing.get_origin(kind)
        kind = "str" if origin is Literal else str(kind) if origin else kind.__name__  # `list[float]` stays whole
        default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        kind = f"`{kind}`, " + ("*optional*" if default in (None, [], {}) else f"defaults to {default!r}")
        entry = f"{spec.name} ({kind}): {spec.metadata['help']}"
        lines += textwrap.wrap(entry, 116, initial_indent="    ", subsequent_indent="        ")
    cls.__doc__ += "\n".join(lines) + "\n"


_document_fields(DMDRConfig)


def recipe_folder() -> Path | None:
    """Where the shipped recipes are: the data package `diffusers_dmdr.recipes`, which setup.py builds from
    `examples/train_dmdr/configs/` (found through the import system, so an editable install finds that folder)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("diffusers_dmdr.recipes")
    except ImportError:
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def recipe_names() -> list[str]:
    """The names `--config` accepts for the shipped recipes (`sdxl_4step`, `sd3_medium_4step`, ...)."""
    folder = recipe_folder()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder is not None else []


def resolve_recipe(path: str | Path) -> Path:
    """`--config`'s value as a file: the path itself when it exists, else the shipped recipe of that name
    (`sdxl_4step` or `sdxl_4step.yaml`)."""
    path = Path(path).expanduser()
    folder = recipe_folder()
    if path.is_file() or len(path.parts) > 1 or folder is None:
        return path
    shipped = folder / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML recipe and check its keys against the config fields (a typo must not be silently ignored).
    `path` may also name a shipped recipe (`sdxl_4step`, see [`recipe_names`]).

    A `stage2:` mapping (`learning_rate`, `learning_rate_fake`, `train_batch_size`) sets the `stage2_*` fields.
    """
    path = resolve_recipe(path)
    if not path.is_file():
        names = ", ".join(recipe_names())
        raise FileNotFoundError(
            f"--config {path} does not exist; give a recipe file"
            + (f" or a shipped recipe's name: {names}." if names else ".")
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ValueError(f"--config {path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"--config {path} is not valid YAML{where}: {problem}. Fix that line.") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values.")
    if "allow_reward_import_paths" in values:
        raise ValueError(
            f"{path} sets allow_reward_import_paths: a recipe cannot allow itself to import code. Remove the key and "
            "pass --allow_reward_import_paths on the command line if you trust the recipe."
        )
    stage2 = values.pop("stage2", None) or {}
    if not isinstance(stage2, dict) or set(stage2) - set(STAGE2_KEYS):
        raise ValueError(
            f"`stage2` in {path} must be a mapping with keys among {sorted(STAGE2_KEYS)}, got {stage2!r}."
        )
    for key, value in stage2.items():
        if STAGE2_KEYS[key] in values:
            raise ValueError(f"{path} sets both `stage2.{key}` and `{STAGE2_KEYS[key]}`: keep one.")
        values[STAGE2_KEYS[key]] = value
    known = {spec.name for spec in dataclasses.fields(DMDRConfig) if spec.init}
    unknown = sorted(set(values) - known)
    replaced = [key for key in unknown if key in REPLACED_OPTIONS]
    if replaced:
        raise ValueError(f"{path} sets `{replaced[0]}`, which was removed: {REPLACED_OPTIONS[replaced[0]]}.")
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} in {path}; see `train.py --help` for the option names.")
    for key in _SPEC_LIST_FIELDS:
        specs = values.get(key) or []
        if not isinstance(specs, list) or not all(isinstance(spec, str | dict) for spec in specs):
            raise ValueError(f"`{key}` in {path} must be a list of `name:weight` strings or mappings with a `name`.")
    return values


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-4` -> `--learning_rate=-1e-4`: argparse takes `-1e-4` for an option (it only recognises
    `-1` and `-1.5` as numbers), so a negative number after a `--flag` is attached to it."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_NUMBER.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def _none_or(kind: type):
    """The command line's converter of an optional field: `none`/`null` is None (`--checkpoints_total_limit none`)."""

    def convert(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog (e.g. the reward list) kept line by line."""


class DMDRArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over `DMDRConfig`, with the options filed under the `OPTION_GROUPS` titles of `--help` and
    `none` accepted by the optional numbers and strings."""

    _OPTIONAL_FIELDS = {
        name for name, hint in typing.get_type_hints(DMDRConfig).items() if type(None) in typing.get_args(hint)
    }

    def __init__(self, epilog: str | None = None, prog: str | None = None):
        self._group = None
        super().__init__(
            DMDRConfig,
            prog=prog,
            description="Distil a diffusers text-to-image teacher into a few-step student with DMDR.",
            formatter_class=_HelpFormatter,
            epilog=epilog,
        )
        self._group = None
        self.add_argument("--config", default=None, help="YAML recipe whose values the flags override.")

    def add_argument(self, *names, **kwargs):
        name = names[0].removeprefix("--")
        if name in OPTION_GROUPS:
            self._group = self.add_argument_group(OPTION_GROUPS[name])
        if name in self._OPTIONAL_FIELDS and kwargs.get("type") in (int, float, str):
            kwargs["type"] = _none_or(kwargs["type"])
        if kwargs.get("type") is string_to_bool:
            kwargs["type"] = parse_bool
        return (self._group or super()).add_argument(*names, **kwargs)


def build_argument_parser(epilog: str | None = None, prog: str | None = None) -> DMDRArgumentParser:
    """The training command line's parser; `epilog` is printed after the options (train.py lists the rewards), and
    the usage line names `prog` (default: the running script's name)."""
    return DMDRArgumentParser(epilog, prog)


def _recipe_path(argv: list[str]) -> str | None:
    known_config = argparse.ArgumentParser(add_help=False)
    known_config.add_argument("--config", default=None)
    return known_config.parse_known_args(argv)[0].config
