"""DMDRConfig: every knob of a DMDR run, documented, validated, loadable from YAML and the command line."""

import argparse
import dataclasses
import math
import re
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


FAMILIES = ("auto", "sdxl", "sd15", "sd3", "flux", "flux2", "zimage", "qwenimage")


@dataclass
class DMDRConfig:
    r"""
    Configuration of a DMDR run (https://huggingface.co/papers/2511.13649). Every step count counts **generator
    updates**; the fake score is updated `update_ratio` times per generator update. Defaults are the released SD3-M /
    SDXL recipes; `examples/train_dmdr/configs/*.yaml` hold the per-model recipes (their values are checked against
    the released scripts in `tests/data/released_recipes.yaml`).

    > Parameters that control the teacher and the student

    pretrained_model_name_or_path (`str`): the teacher, a diffusers pipeline folder or Hub id.
    revision (`str`, *optional*): Hub revision (branch, tag or commit) of the teacher.
    variant (`str`, *optional*): weight variant of the teacher's files, e.g. `fp16`.
    family (`str`, defaults to `"auto"`): `sdxl`, `sd15`, `sd3`, `flux` (FLUX.1 [dev]), `flux2` (FLUX.2 [klein]
        base), `zimage` (`ZImagePipeline`), `qwenimage` (`QwenImagePipeline`), or `auto` (read from
        `model_index.json`).
    num_student_steps (`int`, defaults to 4): sampling steps of the student, 1-8.
    student_timesteps (`list[float]`, *optional*): the student's timesteps in model units (SDXL 4-step
        `[999, 749, 499, 249]`); by default the family's grid (1-step SDXL: `[399]`; SD3: shift-warped; FLUX, Z-Image
        and Qwen-Image: the teacher scheduler's own schedule at `resolution`, with the resolution-dependent `mu` where
        the scheduler uses dynamic shifting, recorded in the exported scheduler config as `grid_mu`).
    shift (`float`, *optional*): shift of the flow-model grid (SD3-Medium 3, SD3.5-Large 5); for FLUX, Z-Image and
        Qwen-Image a static shift that replaces the teacher scheduler's own shifting.
    training_mode (`str`, defaults to `"lora"`): `lora` trains a student adapter on the shared frozen base; `full`
        trains a full copy of the backbone.
    student_init_path (`str`, *optional*): initialise the student only (teacher, real score and fake-score base stay
        the teacher): a backbone folder (`config.json` + safetensors, or a pipeline folder with `unet/` or
        `transformer/`) or a single backbone `.safetensors` file (both need `training_mode="full"`), or a PEFT LoRA
        `.safetensors` file loaded into the student adapter (`training_mode="lora"`). The released SDXL 1-step run
        starts from DMD2's ODE-regression UNet this way.
    lora_rank, lora_alpha (`int`, `float`; default 64 and 128): rank and alpha of the student LoRA.
    lora_target_modules (`str`, *optional*): comma-separated module names of the student LoRA; default per family.
    fake_lora_rank, fake_lora_alpha (`int`, `float`; default 32 and 32): rank and alpha of the fake-score LoRA.
    fake_lora_target_modules (`str`, *optional*): module names of the fake-score LoRA; default per family.
    init_lora_weights (`str`, defaults to `"gaussian"`): initialisation of both LoRAs' A matrices: `gaussian`
        (normal with std `1 / rank`, the released code's PEFT option) or `kaiming` (PEFT's default Kaiming-uniform,
        2-6x smaller entries at the released ranks). B starts at zero either way.

    > Parameters of DMD, DynaDG, DynaRS and TTUR

    fake_score_lora_scale (`float`, defaults to 2.0): LoRA multiplier of the fake score.
    real_score_lora_scale (`float`, defaults to 0.5): DynaDG's initial multiplier of the fake LoRA in the real score.
    dynamic_steps (`int`, *optional*): K, the generator updates over which DynaDG and DynaRS anneal; 0 disables.
        Unset, it equals `cold_start_steps` (the annealing ends with stage 1, as in the released recipes).
    renoise_beta_alpha, renoise_beta_beta (`float`, defaults to 4.0 and 1.5): DynaRS Beta parameters at step 0.
    update_ratio (`int`, defaults to 5): fake-score updates per generator update.
    real_guidance_scale (`float`, defaults to 7.0): CFG scale of the real score, `uncond + w (cond - uncond)` with the
        family's negative prompt (empty; Qwen-Image: `" "`, its `true_cfg_scale`, with its per-token rescale); at a
        scale <= 1 there is no CFG and no jitter. Z-Image's own `guidance_scale` g is `w = 1 + g`.
    guidance_scale_jitter (`float`, defaults to 0.5): the scale is drawn uniformly in `[scale - jitter, scale +
        jitter]` per generator update.
    guidance_embedding_scale (`float`, defaults to 3.5): guidance-distilled teachers only (FLUX.1 [dev]): the guidance
        embedding the student and the fake score run at (`FluxPipeline`'s default `guidance_scale`), stored in the
        export so that the exported pipeline samples at it. Their real score is one pass at embedding
        `real_guidance_scale` (jittered) instead of two-pass CFG. Ignored by the other families.
    backward_simulation (`str`, *optional*): `sde` (re-noise with fresh noise; SDXL default) or `ode` (deterministic;
        flow default). It also fixes whether the exported scheduler is deterministic.
    flow_x0_noise_level (`float`, defaults to 0.0): flow models only: the clean estimate stops at this noise level,
        `x0 = x_t + (level - t) v`; the released T2I code uses 0.001. Kept in the exported scheduler.

    > Parameters of the two stages and the rewards

    cold_start_steps (`int`, *optional*): stage 1 length (DMD only); rewards join from this generator step. Unset,
        it is half of `max_train_steps`.
    stage2_learning_rate, stage2_learning_rate_fake (`float`, *optional*): student and fake-score learning rates
        from `cold_start_steps` on (within one run, and on a resume past it); unset keeps the stage-1 rates. In YAML
        also as a `stage2:` mapping (`stage2: {learning_rate: 5.0e-7, learning_rate_fake: 2.0e-7}`).
    stage2_train_batch_size (`int`, *optional*): prompts per process per iteration in stage 2 (the released scripts
        halve it); unset keeps `train_batch_size`.
    reward (`list[str]`): rewards as `name[:weight][:key=value...]`, repeatable (`--reward clip:0.3`). On the command
        line the flags replace a recipe's list; `--reward none` clears it.
    eval_reward (`list[str]`): held-out rewards, logged and never trained on (reward-hacking monitor); same syntax.
    reward_vae_model_name_or_path (`str`, *optional*): a diffusers `AutoencoderTiny` that decodes x0 for the rewards.
    reward_vae_revision (`str`, *optional*): Hub revision of that autoencoder (the teacher's `revision` is not used).
    reward_tilt (`bool`): in stage 1, weight each sample's DMD direction by its normalised reward (RT-DM).
    reward_tilt_temperature (`float`, defaults to 1.0): temperature of the RT-DM softmax.
    dmd_loss_weight (`float`, defaults to 1.0): weight of the DMD loss; 0 gives reward-only training (ablation).
    anchor_loss_weight (`float`, defaults to 0.0): weight of an L2 anchor to the student as this run started.

    > Parameters of the prompt data

    train_prompts (`str`): a .txt (one prompt per line), .json/.jsonl/.csv/.parquet file, or a Hub dataset id.
    prompt_column (`str`, *optional*): the column holding the prompts (`text` for .txt, else `prompt`).
    dataset_config_name (`str`, *optional*): config of a Hub dataset.
    dataset_split (`str`, defaults to `"train"`): split of the prompt dataset.
    max_train_samples (`int`, *optional*): keep only the first N prompts.
    resolution (`int`, defaults to 1024): square training resolution in pixels (the height when `width` is set).
    width (`int`, *optional*): training width in pixels for non-square images (e.g. `--resolution 32 --width 64`);
        defaults to `resolution`.

    > Parameters of the optimisation

    max_train_steps (`int`, defaults to 3000): generator updates to train for (both stages).
    train_batch_size (`int`, defaults to 1): prompts per process per iteration in stage 1. The global batch is
        `train_batch_size x processes`.
    learning_rate, learning_rate_fake (`float`, defaults to 1e-6 and 5e-7): stage-1 learning rates of the student
        and the fake score.
    lr_scheduler (`str`, defaults to `"constant"`): a diffusers LR schedule name (both networks).
    lr_warmup_steps (`int`, defaults to 0): warmup of both schedules, in generator updates.
    adam_beta1, adam_beta2, adam_epsilon (`float`, defaults to 0.9, 0.999, 1e-8): AdamW constants.
    adam_weight_decay, adam_weight_decay_fake (`float`, defaults to 0.01 and 0): weight decay of the student and of
        the fake score.
    max_grad_norm (`float`, defaults to 1.0): gradient-norm clip of both networks.
    use_8bit_adam (`bool`): bitsandbytes AdamW8bit for both networks (the released T2I scripts).
    gradient_checkpointing (`bool`): trade compute for activation memory.
    mixed_precision (`str`, *optional*): `no`, `fp16` or `bf16`: dtype of the frozen weights (teacher, encoders,
        rewards) and of autocast; default: accelerate's config.
    allow_tf32 (`bool`): allow TF32 matmuls and convolutions on Ampere+ GPUs (the GPU recipes turn it on).
    seed (`int`, defaults to 0): seed of every random draw (noise, timesteps, prompts, CFG, control words).

    > Parameters of logging, validation, checkpoints and export

    output_dir (`str`, defaults to `"dmdr-model"`): checkpoints, logs and the export go here.
    logging_dir (`str`, defaults to `"logs"`): tracker folder, relative to `output_dir`.
    report_to (`str`, defaults to `"tensorboard"`): `tensorboard`, `wandb`, `all` or `none`.
    tracker_project_name (`str`, defaults to `"dmdr"`): tracker project name.
    validation_prompts (`list[str]`, *optional*): prompts of the validation grids.
    validation_steps (`int`, defaults to 500): log a validation grid every N generator steps.
    num_validation_images (`int`, defaults to 2): images per validation prompt.
    checkpointing_steps (`int`, defaults to 500): save a resumable state every N generator steps.
    resume_from_checkpoint (`str`, *optional*): a checkpoint folder, or `latest` in `output_dir`.
    push_to_hub (`bool`): upload the export to the Hub (token from `huggingface-cli login`).
    hub_model_id (`str`, *optional*): repo id of the upload (`org/name`).
    hub_private (`bool`): create the Hub repo as private.
    export_full_pipeline (`bool`, defaults to `True`): in LoRA mode, also export the fused full pipeline.
    base_model (`str`, *optional*): the teacher's Hub id (`org/name`) when `pretrained_model_name_or_path` is a local
        copy: the exported card's `base_model` and its snippets name it. Unset for a local teacher, the card says so
        and its snippets carry a placeholder (the export warns).
    allow_reward_import_paths (`bool`, defaults to `False`): let a YAML recipe name rewards (or a classifier's
        `module`) by import path `pkg.module.Attr`. Importing runs the module's code, so a recipe file (which may be
        downloaded) cannot opt in itself: pass `--allow_reward_import_paths` on the command line. Import paths typed
        on the command line need no opt-in. Either way the path must resolve to a reward class or function.

    > Parameters of the reliability guards

    max_consecutive_nonfinite_steps (`int`, defaults to 5): abort after this many NaN/inf updates in a row.
    divergence_loss_factor (`float`, defaults to 100.0): the run stops when a generator or fake-score loss exceeds
        this many times its running reference (`guards.DivergenceGuard`); 0 disables the loss rule.
    divergence_weight_norm_factor (`float`, defaults to 10.0): the run stops when the norm of the trainable weights
        exceeds this many times its value at the start of the run; 0 disables the weight rule.
    divergence_warmup_steps (`int`, defaults to 5): healthy generator steps that build the loss reference before the
        loss rule applies.
    checkpoints_total_limit (`int`, *optional*): keep the newest N >= 1 complete checkpoints; unset keeps all.
    hub_timeout (`float`, defaults to 90.0): seconds a Hub request of the export may take (each call, its retries
        included); a dead or hanging Hub then fails with the command that retries the upload.

    > Parameters of scale and memory

    gradient_accumulation_steps (`int`, defaults to 1): micro-batches of `train_batch_size` accumulated into each
        update of either network; a generator update and a fake-score update are each this many micro-batches.
    cache_prompt_embeds (`bool`): encode the prompt set once, cache the embeddings on the host and on disk
        (`prompt_embeds_cache_dir`, keyed by the teacher, the resolution and the prompts), keep text encoders off the GPU.
    offload_text_encoders (`bool`): keep the text encoders on the CPU between encodes (prompt sets too big to cache).
    prompt_embeds_cache_dir (`str`, *optional*): where `cache_prompt_embeds` keeps its on-disk cache.
    memory_plan_num_processes (`int`, *optional*): the process count for which preflight's memory plan reports the
        per-process bytes under FSDP2 sharding (default: the launch's `WORLD_SIZE`, 1 without a launcher). The plan
        counts weights, gradients and optimizer states exactly from the component configs; activations are not in it.
    max_memory_gib (`float`, *optional*): GPU memory per process the run must fit in. Preflight then estimates a whole
        iteration, activations included (`memory_estimate.check_memory_budget`: fake tensors, no weights), and refuses
        a run over it, naming the cheapest options that would fit.
    """

    # > Teacher and student
    pretrained_model_name_or_path: str = field(
        default=None, metadata={"help": "Teacher: a diffusers pipeline folder or a Hub model id.", "required": True}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the teacher, e.g. `fp16`."})
    family: Literal["auto", "sdxl", "sd15", "sd3", "flux", "flux2", "zimage", "qwenimage"] = field(
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
    init_lora_weights: Literal["gaussian", "kaiming"] = field(
        default="gaussian",
        metadata={"help": "LoRA A init: `gaussian` (std 1/rank, the released code) or `kaiming` (PEFT's default)."},
    )
    student_init_path: str | None = field(
        default=None,
        metadata={
            "help": "Initialise only the student: a backbone folder or .safetensors file (--training_mode full) or "
            "a PEFT LoRA .safetensors (--training_mode lora). The teacher and both scores stay the teacher."
        },
    )

    # > DMD, DynaDG, DynaRS, TTUR
    fake_score_lora_scale: float = field(default=2.0, metadata={"help": "LoRA multiplier of the fake score."})
    real_score_lora_scale: float = field(
        default=0.5, metadata={"help": "DynaDG: initial multiplier of the fake LoRA inside the real score."}
    )
    dynamic_steps: int | None = field(
        default=None,
        metadata={"help": "K: generator updates over which DynaDG and DynaRS anneal (0 = off); default: stage 1."},
    )
    renoise_beta_alpha: float = field(default=4.0, metadata={"help": "DynaRS: Beta `a` at step 0."})
    renoise_beta_beta: float = field(default=1.5, metadata={"help": "DynaRS: Beta `b` at step 0."})
    update_ratio: int = field(default=5, metadata={"help": "Fake-score updates per generator update (TTUR)."})
    real_guidance_scale: float = field(default=7.0, metadata={"help": "CFG scale of the real score."})
    guidance_scale_jitter: float = field(
        default=0.5, metadata={"help": "Half-width of the uniform jitter on the real-score CFG scale."}
    )
    guidance_embedding_scale: float = field(
        default=3.5,
        metadata={
            "help": "FLUX.1 [dev] (guidance-distilled): guidance embedding of the student and the fake score, stored "
            "in the export; the real score runs at --real_guidance_scale as an embedding (one pass)."
        },
    )
    backward_simulation: Literal["sde", "ode"] | None = field(
        default=None, metadata={"help": "`sde` (fresh noise) or `ode` (deterministic); default per family."}
    )
    flow_x0_noise_level: float = field(
        default=0.0,
        metadata={
            "help": "Flow models: x0 = x_t + (level - t) v stops at this noise level (released T2I code: 0.001)."
        },
    )

    # > Stages and rewards
    cold_start_steps: int | None = field(
        default=None,
        metadata={"help": "Stage 1 length in generator updates; rewards join after it. Default: half the run."},
    )
    stage2_learning_rate: float | None = field(
        default=None, metadata={"help": "Student learning rate from --cold_start_steps on; default: stage 1's."}
    )
    stage2_learning_rate_fake: float | None = field(
        default=None, metadata={"help": "Fake-score learning rate from --cold_start_steps on; default: stage 1's."}
    )
    stage2_train_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per process per iteration in stage 2; default: stage 1's."}
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
    reward_vae_revision: str | None = field(
        default=None, metadata={"help": "Hub revision of --reward_vae_model_name_or_path."}
    )
    reward_tilt: bool = field(
        default=False, metadata={"help": "Stage 1: weight DMD per sample by the normalised reward (RT-DM)."}
    )
    reward_tilt_temperature: float = field(default=1.0, metadata={"help": "Temperature of the RT-DM softmax."})
    allow_reward_import_paths: bool = field(
        default=False,
        metadata={
            "help": "Allow rewards named by import path (pkg.module.Attr) in a YAML recipe; only valid on the "
            "command line, since importing a module runs its code."
        },
    )
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
    width: int | None = field(
        default=None, metadata={"help": "Training width in pixels, for non-square images (default: --resolution)."}
    )

    # > Optimisation
    max_train_steps: int = field(default=3000, metadata={"help": "Generator updates to train for."})
    train_batch_size: int = field(default=1, metadata={"help": "Prompts per process per micro-batch (stage 1)."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches accumulated into every update of both networks (effective batch per process = "
            "train_batch_size x this; the TTUR ratio still counts updates)."
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate of the student (stage 1)."})
    learning_rate_fake: float = field(default=5e-7, metadata={"help": "Learning rate of the fake score (stage 1)."})
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
    max_memory_gib: float | None = field(
        default=None,
        metadata={"help": "GPU memory per process the run must fit in; preflight estimates the whole iteration."},
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Precision of frozen weights and autocast; default: accelerate's config."}
    )
    allow_tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls and convolutions on Ampere+ GPUs."})
    max_consecutive_nonfinite_steps: int = field(
        default=5, metadata={"help": "Abort after this many NaN/inf losses in a row (each one skips its step)."}
    )
    divergence_loss_factor: float = field(
        default=100.0, metadata={"help": "Stop when a loss exceeds this many times its running reference (0 = off)."}
    )
    divergence_weight_norm_factor: float = field(
        default=10.0,
        metadata={"help": "Stop when the trainable-weight norm exceeds this many times its start value (0 = off)."},
    )
    divergence_warmup_steps: int = field(
        default=5, metadata={"help": "Healthy generator steps that build the loss reference of the divergence guard."}
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
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep the newest N >= 1 complete checkpoints (default: all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or `latest` in output_dir."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to the Hub (token from login)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id for --push_to_hub (org/name)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_timeout: float = field(
        default=90.0, metadata={"help": "Seconds each Hub request of the export may take, retries included."}
    )
    export_full_pipeline: bool = field(
        default=True,
        metadata={
            "help": "In LoRA mode, also export the fused full pipeline, so that `DiffusionPipeline.from_pretrained("
            "repo, trust_remote_code=True)` works; `false` exports the LoRA alone (smaller, loads onto the teacher)."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's Hub id (org/name) when --pretrained_model_name_or_path is a local copy; the "
            "exported model card and its snippets name it."
        },
    )

    def __post_init__(self):
        if isinstance(self.reward, str):
            self.reward = [self.reward]
        if isinstance(self.eval_reward, str):
            self.eval_reward = [self.eval_reward]
        if isinstance(self.validation_prompts, str):
            self.validation_prompts = [self.validation_prompts]
        problems = coerce_field_types(self)
        if problems:
            raise ValueError("Invalid DMDR configuration:\n- " + "\n- ".join(problems))
        # Unset stage lengths follow the run's length: half the run in stage 1, annealing within stage 1.
        if self.cold_start_steps is None:
            self.cold_start_steps = self.max_train_steps // 2
        if self.dynamic_steps is None:
            self.dynamic_steps = self.cold_start_steps
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
        for name in ("stage2_learning_rate", "stage2_learning_rate_fake", "stage2_train_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"--{name} must be positive, got {value}; leave it unset to keep the stage-1 value.")
        if self.flow_x0_noise_level < 0 or self.flow_x0_noise_level >= 0.1:
            problems.append(f"--flow_x0_noise_level must be in [0, 0.1), got {self.flow_x0_noise_level}.")
        if self.init_lora_weights not in ("gaussian", "kaiming"):
            problems.append(f"--init_lora_weights must be `gaussian` or `kaiming`, got {self.init_lora_weights!r}.")
        if self.renoise_beta_alpha <= 0 or self.renoise_beta_beta <= 0:
            problems.append("--renoise_beta_alpha and --renoise_beta_beta must be positive.")
        if self.guidance_scale_jitter < 0:
            problems.append("--guidance_scale_jitter must be non-negative.")
        if not math.isfinite(self.guidance_embedding_scale) or self.guidance_embedding_scale < 0:
            problems.append(
                f"--guidance_embedding_scale must be a non-negative number (FLUX.1 [dev] default 3.5), got "
                f"{self.guidance_embedding_scale}."
            )
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
        if self.reward_tilt_temperature <= 0:
            problems.append("--reward_tilt_temperature must be positive.")
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

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        """The recipe at `path` with `overrides` on top; import-path rewards of the recipe need
        `allow_reward_import_paths=True` among the overrides."""
        values = load_yaml_config(path)
        check_recipe_import_paths(values, path, bool(overrides.get("allow_reward_import_paths")))
        return cls(**{**values, **overrides})

    @classmethod
    def parse_args(cls, argv: list[str] | None = None) -> "DMDRConfig":
        """Parse `argv` (default: `sys.argv`), with `--config recipe.yaml` supplying defaults the CLI overrides."""
        config = cls(**vars(build_argument_parser().parse_args(argv)))
        recipe = _recipe_path(argv)
        if recipe is not None:
            # `allow_reward_import_paths` cannot come from the recipe (load_yaml_config refuses it there).
            check_recipe_import_paths(load_yaml_config(recipe), recipe, config.allow_reward_import_paths)
        return config


# Fields only the command line may set (never saved into, nor read from, a recipe).
_COMMAND_LINE_ONLY = ("allow_reward_import_paths",)


def _recipe_path(argv: list[str] | None) -> str | None:
    known_config = argparse.ArgumentParser(add_help=False)
    known_config.add_argument("--config", default=None)
    return known_config.parse_known_args(argv)[0].config


def check_recipe_import_paths(values: dict, path: str | Path, allowed: bool) -> None:
    """Refuse the import paths to user code that the rewards of a recipe name, unless the command line opted in."""
    from .rewards.core import reward_import_paths

    if allowed:
        return
    for key in ("reward", "eval_reward"):
        for spec in values.get(key) or []:
            paths = reward_import_paths(spec)
            if paths:
                raise ValueError(
                    f"{path}: `{key}` names the import path {paths[0]!r}; importing it would run code from a recipe "
                    "file. If you trust this recipe, pass --allow_reward_import_paths on the command line; otherwise "
                    f"use a registered reward {_registered_rewards()}."
                )


def _registered_rewards() -> list[str]:
    from .rewards.core import REWARD_REGISTRY

    return sorted(REWARD_REGISTRY)


def _describe_type(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(value, kind):
    """`value` as `kind` (a type hint of a DMDRConfig field), or raise `TypeError` with what was expected."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        kind = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]  # noqa: UP007
        args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in args:
            raise TypeError(f"one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TypeError(f"a list of {_describe_type(args[0])}")
        return [_coerce(item, args[0]) for item in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise TypeError("true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError("an integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    return value


# Fields whose items `rewards.parse_reward_spec` validates (strings or mappings).
_SPEC_LIST_FIELDS = ("reward", "eval_reward")


def coerce_field_types(config: "DMDRConfig") -> list[str]:
    """Coerce every field of `config` to its type hint in place (`"1e-4"` -> `1e-4`, `"true"` -> `True`); return one
    problem per field that cannot be, naming the flag and the expected type."""
    problems = []
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        if spec.name in _SPEC_LIST_FIELDS:
            continue
        value = getattr(config, spec.name)
        if value is None and spec.metadata.get("required"):
            continue  # reported as missing by __post_init__
        try:
            setattr(config, spec.name, _coerce(value, hints[spec.name]))
        except TypeError as error:
            problems.append(f"--{spec.name} must be {error}, got {value!r} ({type(value).__name__}).")
    return problems


# Keys of a recipe's `stage2:` mapping and the config fields they set.
STAGE2_KEYS = {
    "learning_rate": "stage2_learning_rate",
    "learning_rate_fake": "stage2_learning_rate_fake",
    "train_batch_size": "stage2_train_batch_size",
}
# `--help` groups: the first field of each group, in the dataclass's field order.
OPTION_GROUPS = {
    "pretrained_model_name_or_path": "Teacher and student",
    "fake_score_lora_scale": "Method (DMD, DynaDG, DynaRS, TTUR)",
    "cold_start_steps": "Stages and rewards",
    "train_prompts": "Prompt data",
    "max_train_steps": "Optimisation",
    "output_dir": "Logging, validation, checkpoints and export",
}
# The errors that config validation and the preflight checks raise for a bad input: `train.py` prints them as one
# message and exits with status 2.
USER_INPUT_ERRORS = (ValueError, FileNotFoundError, ImportError)


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML recipe and check its keys against the config fields (a typo must not be silently ignored).

    A `stage2:` mapping (`learning_rate`, `learning_rate_fake`, `train_batch_size`) sets the `stage2_*` fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} is not a file.")
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


class _CommandLineList(list):
    """A list built from command-line flags (as opposed to the recipe's default list)."""


class _ReplacingAppend(argparse.Action):
    """`--reward a --reward b`: the flags given on the command line *replace* the recipe's list; `none` clears it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if not isinstance(current, _CommandLineList):
            current = _CommandLineList()
        if str(values).strip().lower() == "none":
            current.clear()
        else:
            current.append(values)
        setattr(namespace, self.dest, current)


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


def reward_names_epilog() -> str:
    """The built-in reward names with one line each, from the registry (what `--reward` accepts besides a dotted
    import path)."""
    from .rewards import REWARD_REGISTRY

    lines = ["built-in rewards (--reward NAME[:WEIGHT][:key=value...], or a dotted import path):"]
    for name, factory in sorted(REWARD_REGISTRY.items()):
        paragraph = " ".join(line.strip() for line in (factory.__doc__ or "").strip().split("\n\n")[0].splitlines())
        summary = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
        lines.append(f"  {name:<12} {summary}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog (the reward list) kept line by line."""


def build_argument_parser() -> argparse.ArgumentParser:
    """An argparse parser generated from the dataclass fields: help from metadata, choices from `Literal`, options
    grouped as in the class docstring, the built-in reward names in the epilog."""
    parser = argparse.ArgumentParser(
        description="Distil a diffusers text-to-image teacher into a few-step student with DMDR.",
        formatter_class=_HelpFormatter,
        epilog=reward_names_epilog(),
    )
    parser.add_argument("--config", default=None, help="YAML recipe whose values become defaults.")
    hints = typing.get_type_hints(DMDRConfig)
    group = parser
    for spec in dataclasses.fields(DMDRConfig):
        if spec.name in OPTION_GROUPS:
            group = parser.add_argument_group(OPTION_GROUPS[spec.name])
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
                kwargs.update(action=_ReplacingAppend, type=str, default=None)
                kwargs["help"] += " Given here, it replaces the recipe's list; `none` clears it."
            else:
                kwargs.update(nargs="+", type=item_type)
        elif inner in (int, float, str):
            kwargs["type"] = _optional(inner) if optional else inner
        group.add_argument(f"--{spec.name}", **kwargs)

    original_parse = parser.parse_args

    def parse_args(argv=None, namespace=None):
        argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
        # Two passes: read `--config` first so its values become defaults that explicit flags override.
        known_config = argparse.ArgumentParser(add_help=False)
        known_config.add_argument("--config", default=None)
        config_args, _ = known_config.parse_known_args(argv)
        if config_args.config:
            parser.set_defaults(**load_yaml_config(config_args.config))
        namespace = original_parse(argv, namespace)
        for name in ("reward", "eval_reward"):
            value = getattr(namespace, name)
            setattr(namespace, name, list(value) if value is not None else list(parser.get_default(name) or []))
        del namespace.config
        return namespace

    parser.parse_args = parse_args
    return parser
