"""The model card of an export: YAML metadata, samples, loading snippets, sampler, recipe and limitations.

Everything the card says comes from one [`ModelCardInfo`]; [`make_model_card`] turns it into a
`huggingface_hub.ModelCard` without any Hub request (the teacher's licence is read from its folder or the local Hub
cache, and from the Hub only for an export about to be pushed).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import DMDRConfig
from .export_layout import (
    LORA_WEIGHT_NAME,
    PIPELINE_CLASS,
    PIPELINE_MODULE,
    SAMPLES_FILE,
    SCHEDULER_CLASS,
    SCHEDULER_MODULE,
)
from .families import ModelFamily
from .hub import cached_model_card_data, hub_id_of, remote_model_card_data
from .lora_formats import KOHYA_LORA_WEIGHT_NAME
from .pipelines.scheduling_dmdr import DMDRScheduler
from .rewards import parse_reward_spec


logger = logging.getLogger(__name__)

PAPER_URL = "https://huggingface.co/papers/2511.13649"
# Tags every export carries, besides the family's and `lora` in LoRA mode.
BASE_TAGS = ["text-to-image", "diffusers", "diffusers-training", "dmdr", "distillation", "few-step"]
DEFAULT_SNIPPET_PROMPT = "a photo of a red fox in the snow"
# What the snippets load as the teacher when it was a local folder and no `--base_model` named its Hub id.
BASE_MODEL_PLACEHOLDER = "<teacher-hub-id>"


@dataclass
class ModelCardInfo:
    """What the model card of one export describes.

    Args:
        config ([`DMDRConfig`]):
            The run's configuration: the recipe table, the validation prompts, resolution and seed of the samples.
        family ([`ModelFamily`]):
            The model family (stock pipeline class, backbone name, tags).
        scheduler ([`DMDRScheduler`]):
            The student's scheduler: the trained grid, prediction type and re-noising rule.
        repo_id (`str`):
            The Hub repo id the snippets load (the export folder's name when no `hub_model_id` is set).
        base_model (`str`, *optional*):
            The teacher's Hub id as given (`--base_model`); when `None` it is read from the teacher's source if
            that is a Hub id or a Hub cache snapshot (see [`ModelCardInfo.teacher_hub_id`]).
        has_lora (`bool`, defaults to `True`):
            The export holds the student LoRA in diffusers format.
        has_comfy_lora (`bool`, defaults to `False`):
            The export also holds the LoRA in ComfyUI / kohya keys (`pytorch_lora_weights_kohya.safetensors`).
        has_full_pipeline (`bool`, defaults to `False`):
            The export holds the full student pipeline (`model_index.json` and the component folders).
        has_samples (`bool`, defaults to `False`):
            The export holds the sample grid of the validation prompts.
        metrics (`dict`, defaults to `{}`):
            The last training logs (rewards, losses) for the metrics table.
        checkpoint_name (`str`, *optional*):
            The checkpoint exported (`checkpoint-N`), when the export was rebuilt from one.
        backbone_class_name (`str`, *optional*):
            The class of the saved full student's backbone (`UNet2DConditionModel`, `SD3Transformer2DModel`, ...),
            for the stock-pipeline snippet of a full export.
    """

    config: DMDRConfig
    family: ModelFamily
    scheduler: DMDRScheduler
    repo_id: str
    base_model: str | None = None
    has_lora: bool = True
    has_comfy_lora: bool = False
    has_full_pipeline: bool = False
    has_samples: bool = False
    metrics: dict = field(default_factory=dict)
    checkpoint_name: str | None = None
    backbone_class_name: str | None = None

    @property
    def teacher_hub_id(self) -> str | None:
        """The teacher's Hub id: `base_model`, else the teacher's source when it names one; `None` for a local
        folder."""
        return self.base_model or hub_id_of(self.config.pretrained_model_name_or_path)

    @property
    def teacher_name(self) -> str:
        """How the snippets name the teacher: its Hub id, else a placeholder to replace (a local folder is no use to
        the card's readers)."""
        return self.teacher_hub_id or BASE_MODEL_PLACEHOLDER

    @property
    def rewards_trained(self) -> bool:
        """Whether the student was trained on a reward: a positive-weight reward and a stage 2 that ran."""
        config = self.config
        weights = [parse_reward_spec(spec).weight for spec in config.reward or []]
        cold_start = config.max_train_steps // 2 if config.cold_start_steps is None else config.cold_start_steps
        return any(weight > 0 for weight in weights) and config.max_train_steps > cold_start

    @property
    def snippet_dtype(self) -> str:
        """The GPU dtype of the snippets: the run's mixed precision, else bf16 for flow models and fp16 for UNets."""
        precision = self.config.mixed_precision
        if precision in ("bf16", "fp16"):
            return {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
        return "torch.bfloat16" if self.family.is_flow else "torch.float16"


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------
def teacher_license(
    source: str, hub_id: str | None = None, revision: str | None = None, hub_timeout: float | None = None
) -> dict[str, str]:
    """`license` (with `license_name`/`license_link` for custom licenses) from the teacher's model card: the
    `README.md` of a local teacher folder, else the card of `hub_id` from the local Hub cache, else (only with
    `hub_timeout`, i.e. when the export is pushed) from the Hub within `hub_timeout` seconds. Empty when none."""
    from huggingface_hub import ModelCard

    local_card = Path(source).expanduser() / "README.md"
    if local_card.is_file():
        try:
            data = ModelCard.load(local_card).data.to_dict()
        except (OSError, ValueError) as error:
            logger.warning(f"Could not read {local_card} ({type(error).__name__}); the card has no license.")
            data = {}
    elif hub_id is None:
        return {}
    else:
        data = cached_model_card_data(hub_id, revision)
        if not data and hub_timeout is not None:
            data = remote_model_card_data(hub_id, revision, hub_timeout)
    found = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
    link = found.get("license_link")
    if link and hub_id and not link.startswith(("http://", "https://")):
        # A relative link points into the teacher's repo, not into the export.
        found["license_link"] = f"https://huggingface.co/{hub_id}/blob/{revision or 'main'}/{link}"
    return found


def make_model_card(info: ModelCardInfo, existing_card: str | Path | None = None, hub_timeout: float | None = None):
    """The export's `ModelCard`: YAML metadata, samples, loading snippets, sampler, recipe and limitations.

    Built without any Hub request: `existing_card` (the README.md of a previous export in the same folder) keeps the
    metadata this export does not own; the teacher's licence comes from its folder or the local Hub cache, and from
    the Hub only when `hub_timeout` is given (a push), within that many seconds.

    Args:
        info ([`ModelCardInfo`]): what the card describes.
        existing_card (`str` or `Path`, *optional*): the card of a previous export in the same folder.
        hub_timeout (`float`, *optional*): seconds the Hub may take to give the teacher's card; `None` asks nothing.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    config, base_model = info.config, info.teacher_hub_id
    license_data = teacher_license(config.pretrained_model_name_or_path, base_model, config.revision, hub_timeout)
    prompts = config.validation_prompts or []
    widget = [{"text": prompts[0], "output": {"url": SAMPLES_FILE}}] if info.has_samples and prompts else None
    body = _card_body(info)
    # A new export gets fresh metadata; a previous export's card (re-export into the same folder) keeps the metadata
    # this export does not own, while everything below is set afresh. The Hub is never asked for a card here.
    if existing_card is not None and Path(existing_card).is_file():
        card = ModelCard.load(existing_card)
    else:
        card = ModelCard("")
        card.data = ModelCardData(
            license=license_data.get("license"), library_name="diffusers", base_model=base_model, widget=widget
        )
    tags = BASE_TAGS + list(info.family.card_tags) + (["lora"] if info.has_lora else [])
    populate_model_card(card, tags=[tag for tag in tags if tag not in (card.data.tags or [])])
    owned = {"base_model": base_model, "widget": widget, "inference": True, "pipeline_tag": "text-to-image"}
    for key, value in {**owned, **license_data}.items():
        if value is not None:
            setattr(card.data, key, value)
    # The template's placeholder sections would follow ours; the export writes every section, so the body replaces them.
    card.text = body
    return card


# ----------------------------------------------------------------------------------------------------------------
# Body
# ----------------------------------------------------------------------------------------------------------------
def _card_body(info: ModelCardInfo) -> str:
    config, scheduler = info.config, info.scheduler
    repo_id, base_model, has_lora = info.repo_id, info.teacher_name, info.has_lora
    has_full_pipeline, has_samples, metrics = info.has_full_pipeline, info.has_samples, info.metrics
    timesteps = list(scheduler.config.training_timesteps)
    num_steps = len(timesteps)
    if num_steps == 1:
        sampler_rule = "The single step maps pure noise to the clean prediction."
    elif scheduler.config.deterministic:
        sampler_rule = (
            "Between steps the clean prediction is re-noised deterministically (the ODE sampler: Euler for flow "
            "models, DDIM for DDPM models); the last step returns the clean prediction."
        )
    else:
        sampler_rule = (
            "Between steps the clean prediction is re-noised with fresh Gaussian noise (the DMD sampler); the last "
            "step returns the clean prediction."
        )
    if info.teacher_hub_id:
        base_link = f"[`{base_model}`](https://huggingface.co/{base_model})"
    else:
        local_name = Path(config.pretrained_model_name_or_path).name
        base_link = (
            f"a local copy of a teacher (`{local_name}`; its Hub id was not given: re-export with "
            "`dmdr-export --base_model org/name` to fill `base_model` and the snippets)"
        )
    if info.rewards_trained:
        method = (
            f"[DMDR]({PAPER_URL}) (distribution matching distillation jointly with reinforcement learning from "
            "differentiable rewards)"
        )
    else:
        method = (
            f"DMD (distribution matching distillation, the [DMDR]({PAPER_URL}) recipe without reward losses: this "
            "run trained on no reward)"
        )
    sections = [
        f"# {repo_id.split('/')[-1]}\n",
        f"A **{num_steps}-step** text-to-image student distilled from {base_link} with {method}, trained with "
        "[diffusers-dmdr](https://pypi.org/project/diffusers-dmdr/). It samples in "
        f"{num_steps} step{'s' if num_steps > 1 else ''} without classifier-free guidance.\n",
    ]
    if has_samples:
        prompt_list = "\n".join(f"- {prompt}" for prompt in config.validation_prompts)
        sections.append(
            f"## Samples\n\n![samples]({SAMPLES_FILE})\n\nOne row per prompt, {config.num_validation_images} "
            f"images each, {num_steps} step{'s' if num_steps > 1 else ''}, seed {config.seed}, "
            "{}x{}:\n\n".format(*config.image_size)
            + f"{prompt_list}\n"
        )
    sections.append(_usage_section(info))
    if info.has_comfy_lora:
        sections.append(_comfy_section(info))
    schedule_rows = "\n".join(
        f"| {index} | {timestep:g} | {timestep / scheduler.config.num_train_timesteps:.4f} |"
        for index, timestep in enumerate(timesteps)
    )
    sections.append(
        "## Sampler\n\n"
        f"The student was trained with, and samples with, this {num_steps}-step grid "
        f"(`prediction_type={scheduler.config.prediction_type}`, {scheduler.config.num_train_timesteps} teacher "
        "timesteps). The first step always starts from pure noise.\n\n"
        "| step | timestep (model units) | noise level |\n|---|---|---|\n"
        f"{schedule_rows}\n\n"
        f"{sampler_rule} `DMDRScheduler` (in `scheduler/`) stores this grid in its config. Another "
        "`num_inference_steps` works with a warning: the grid is then interpolated linearly between the trained "
        "first and last timesteps, which the student was not trained for.\n"
    )
    sections.append(_recipe_section(info))
    if metrics:
        rows = "\n".join(
            f"| `{name}` | {value:.4g} |"
            for name, value in sorted(metrics.items())
            if isinstance(value, int | float) and name.startswith(("reward/", "heldout_reward/", "loss", "monitor/"))
        )
        if rows:
            sections.append(
                "## Training metrics\n\nLogged at the last generator step (training prompts, not a benchmark):\n\n"
                f"| metric | value |\n|---|---|\n{rows}\n"
            )
    files = [
        f"- `{LORA_WEIGHT_NAME}`: the student LoRA in diffusers format (`load_lora_weights`)." if has_lora else "",
        f"- `{KOHYA_LORA_WEIGHT_NAME}`: the same LoRA in kohya keys, for ComfyUI, Forge and Automatic1111."
        if info.has_comfy_lora
        else "",
        "- `model_index.json` and the component folders: the full student pipeline (safetensors)."
        if has_full_pipeline
        else "",
        f"- `{PIPELINE_MODULE}.py`, `scheduler/{SCHEDULER_MODULE}.py`: the sampler code, loaded with "
        "`trust_remote_code=True` or from the `diffusers-dmdr` package.",
        f"- `{SAMPLES_FILE}`: the sample grid above." if has_samples else "",
    ]
    sections.append("## Files\n\n" + "\n".join(line for line in files if line) + "\n")
    sections.append(
        "## Limitations\n\n"
        f"- This is a derivative of {base_link}: its license and use restrictions apply, and it inherits the "
        "teacher's biases.\n"
        "- Few-step students trade some sample diversity for speed; rewards can be over-optimised (reward "
        "hacking), so check samples beyond the training prompts.\n"
        "- Classifier-free guidance, negative prompts and step counts other than the trained one are outside "
        "what was trained.\n"
    )
    return "\n".join(sections)


def _snippet(imports: list[str], body: str, gpu_dtype: str) -> str:
    """A runnable snippet: `torch` and `imports`, the device and dtype choice, then `body` (which defines `image`)."""
    device_line = f'device, dtype = ("cuda", {gpu_dtype}) if torch.cuda.is_available() else ("cpu", torch.float32)\n'
    return "import torch\n" + "".join(line + "\n" for line in imports) + "\n" + device_line + body


def _load_lora_lines(pipe: str, info: ModelCardInfo) -> str:
    """Load the diffusers LoRA file onto `pipe`'s backbone and fuse it. The LoRA covers the backbone only:
    `load_lora_adapter` on it (rather than the pipeline's `load_lora_weights`) skips the notice about text encoders
    without LoRA keys."""
    name = info.family.backbone_name
    return (
        f'{pipe}.{name}.load_lora_adapter("{info.repo_id}", weight_name="{LORA_WEIGHT_NAME}", prefix="{name}")\n'
        f"{pipe}.{name}.fuse_lora()\n"
    )


def _usage_section(info: ModelCardInfo) -> str:
    config, family, repo_id, base_model = info.config, info.family, info.repo_id, info.teacher_name
    prompt = (config.validation_prompts or [DEFAULT_SNIPPET_PROMPT])[0]
    size = ""
    if config.image_size != (family.default_resolution,) * 2:
        size = f", height={config.image_size[0]}, width={config.image_size[1]}"
    call = f'image = pipe("{prompt}"{size}).images[0]\n'
    if info.has_full_pipeline:
        route_package = _snippet(
            ["from diffusers_dmdr.pipelines import FewStepDMDRPipeline"],
            f'pipe = FewStepDMDRPipeline.from_pretrained("{repo_id}", dtype=dtype).to(device)\n' + call,
            info.snippet_dtype,
        )
        route_remote = _snippet(
            ["from diffusers import DiffusionPipeline"],
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True, dtype=dtype)\n'
            "pipe = pipe.to(device)\n" + call,
            info.snippet_dtype,
        )
    else:
        # No full pipeline in the repo: the student is the base model plus the LoRA, sampled by FewStepDMDRPipeline.
        # The teacher's folder loads straight into FewStepDMDRPipeline (`from_pipe` casts every model and warns).
        student = (
            f'scheduler = DMDRScheduler.from_pretrained("{repo_id}", subfolder="scheduler")\n'
            f'pipe = FewStepDMDRPipeline.from_pretrained("{base_model}", scheduler=scheduler, dtype=dtype)\n'
            + _load_lora_lines("pipe", info)
            + "pipe = pipe.to(device)\n"
        )
        route_package = _snippet(
            ["from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline"],
            student + call,
            info.snippet_dtype,
        )
        route_remote = _snippet(
            ["from diffusers.utils import get_class_from_dynamic_module"],
            "FewStepDMDRPipeline = get_class_from_dynamic_module(\n"
            f'    "{repo_id}", "{PIPELINE_MODULE}.py", class_name="{PIPELINE_CLASS}", trust_remote_code=True\n'
            ")\n"
            "DMDRScheduler = get_class_from_dynamic_module(\n"
            f'    "{repo_id}", "{SCHEDULER_MODULE}.py", subfolder="scheduler", class_name="{SCHEDULER_CLASS}",\n'
            "    trust_remote_code=True,\n"
            ")\n" + student + call,
            info.snippet_dtype,
        )
    recipe, no_recipe_reason = stock_scheduler_recipe(info.scheduler)
    lines = [
        "## How to use\n",
        "The trained sampler is `FewStepDMDRPipeline` with `DMDRScheduler`: same timesteps, same re-noising rule, no "
        "guidance (the defaults), so a seed gives the images the training produced. Three ways to load it:\n",
        "### 1. With the `diffusers-dmdr` package (`pip install diffusers-dmdr`), no remote code\n",
        f"```python\n{route_package}```\n",
        "### 2. With diffusers only, running this repository's code\n",
        f"`{PIPELINE_MODULE}.py` and `scheduler/{SCHEDULER_MODULE}.py` are plain diffusers code; read them first, "
        "and pin `revision=` to a commit you checked.\n",
        f"```python\n{route_remote}```\n",
        "### 3. A stock diffusers pipeline and scheduler\n",
    ]
    if recipe is None:
        lines.append(
            f"No stock diffusers scheduler follows this student's sampler ({no_recipe_reason}): use 1 or 2.\n"
        )
    else:
        # The scheduler's recipe says whether the stock route is exact, and what differs.
        note = recipe.get("note")
        lines.append(
            "No custom code: this stock scheduler "
            + (
                "reproduces the trained sampler up to float rounding"
                if recipe.get("exact")
                else "follows the trained grid with its own update rule, close to the trained sampler but not bit "
                "for bit"
            )
            + (f" ({note})" if note else "")
            + ".\n"
        )
    if recipe is not None:
        lines.append(f"```python\n{_plain_route(info, recipe, prompt, size)}```\n")
    return "\n".join(lines)


def stock_scheduler_recipe(scheduler: DMDRScheduler) -> tuple[dict | None, str | None]:
    """`(recipe, None)` from [`DMDRScheduler.stock_scheduler_recipe`] (`class_name`, `from_config_kwargs`,
    `call_kwargs`, `exact`, `note`), or `(None, reason)` when no stock diffusers scheduler runs this sampler."""
    recipe = scheduler.stock_scheduler_recipe()
    if recipe.get("class_name"):
        return recipe, None
    return None, recipe.get("note") or "the trained sampler is not one a stock scheduler runs"


def _plain_route(info: ModelCardInfo, recipe: dict, prompt: str, size: str) -> str:
    family, repo_id, base_model = info.family, info.repo_id, info.teacher_name
    stock_class, scheduler_class = family.pipeline_class_name, recipe["class_name"]
    config_kwargs = "".join(f", {key}={value!r}" for key, value in recipe.get("from_config_kwargs", {}).items())
    set_scheduler = f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config{config_kwargs})\n"
    call_kwargs = "".join(f", {key}={value!r}" for key, value in recipe.get("call_kwargs", {}).items())
    # Guidance off (or FLUX.1's trained embedding) and the trained prompt length: the call defaults
    # FewStepDMDRPipeline gives this stock pipeline; the prompt by name (Flux2KleinPipeline takes an image first).
    defaults = {**family.stock_route.call_defaults, **family.export_call_defaults(info.config, None)}
    call_defaults = "".join(f", {key}={value!r}" for key, value in defaults.items())
    call = f'image = pipe(prompt="{prompt}"{call_kwargs}{call_defaults}{size})'
    if info.has_lora:
        imports = [f"from diffusers import {scheduler_class}, {stock_class}"]
        load = f'pipe = {stock_class}.from_pretrained("{base_model}", dtype=dtype)\n' + _load_lora_lines("pipe", info)
    else:
        name = family.backbone_name
        backbone_class = info.backbone_class_name or family.backbone_class_name
        imports = [f"from diffusers import {backbone_class}, {scheduler_class}, {stock_class}"]
        load = (
            f'{name} = {backbone_class}.from_pretrained("{repo_id}", subfolder="{name}", dtype=dtype)\n'
            f'pipe = {stock_class}.from_pretrained("{base_model}", {name}={name}, dtype=dtype)\n'
        )
    body = load + set_scheduler + "pipe = pipe.to(device)\n" + call + ".images[0]\n"
    return _snippet(imports, body, info.snippet_dtype)


def grid_shift(scheduler: DMDRScheduler) -> float | None:
    """The shift a flow grid was built with (informative config key `grid_shift`, formerly `shift`)."""
    config = scheduler.config
    return config.get("grid_shift", config.get("shift"))


def _comfy_section(info: ModelCardInfo) -> str:
    """Which file each tool takes, and the sampler settings closest to the trained one."""
    scheduler, family = info.scheduler, info.family
    timesteps = [int(round(t)) for t in scheduler.config.training_timesteps]
    num_steps = len(timesteps)
    stochastic = not scheduler.config.deterministic and num_steps > 1
    # ComfyUI's `lcm` sampler re-noises the clean prediction with fresh noise (the DMD sampler); `euler` is the ODE.
    sampler = "lcm" if stochastic else "euler"
    trailing = [round(1000 - 1000 * index / num_steps) - 1 for index in range(num_steps)]
    if num_steps == 1:
        schedule = "any scheduler (the one step starts from pure noise)"
    elif family.is_flow:
        shift = grid_shift(scheduler)
        schedule = (
            f"scheduler `simple` with a *ModelSamplingSD3* node at shift {shift:g}"
            if shift is not None
            else "the scheduler whose noise levels match the *Sampler* table below"
        )
    elif timesteps == trailing:
        schedule = f"scheduler `sgm_uniform` (its {num_steps} timesteps are within 1 of the trained {timesteps})"
    else:
        schedule = f"a scheduler as close as possible to the trained timesteps {timesteps} (none matches exactly)"
    lines = [
        "## ComfyUI / Automatic1111\n",
        f"`{KOHYA_LORA_WEIGHT_NAME}` holds the same LoRA with the keys these tools read"
        + (" (`lora_unet_*`, with `.alpha`)" if not family.is_flow else " (`transformer.*`, scale folded in)")
        + f"; `{LORA_WEIGHT_NAME}` is for diffusers (`load_lora_weights`). Load it on the teacher "
        f"({info.teacher_name}) at strength 1.0.\n",
        f"- **ComfyUI**: copy it to `models/loras/`, add *LoraLoaderModelOnly* after the checkpoint loader; KSampler "
        f"with {num_steps} step{'s' if num_steps > 1 else ''}, cfg 1.0, sampler `{sampler}`, {schedule}.",
    ]
    if family.is_flow:
        lines.append(
            "- **Forge** reads the same file (ComfyUI's loader); Automatic1111 does not run this model family."
        )
    else:
        lines.append(
            "- **Automatic1111 / Forge**: copy it to `models/Lora/` and add "
            f"`<lora:{KOHYA_LORA_WEIGHT_NAME.removesuffix('.safetensors')}:1>` to the prompt; sampler "
            f"{'LCM' if sampler == 'lcm' else 'Euler'}, {num_steps} steps, CFG scale 1."
        )
    lines.append(
        "\nThese tools sample with their own schedulers: close to the trained sampler, not bit for bit, and their "
        "seeds do not reproduce the images above.\n"
    )
    return "\n".join(lines)


def _recipe_section(info: ModelCardInfo) -> str:
    config, family, has_lora, checkpoint_name = info.config, info.family, info.has_lora, info.checkpoint_name
    rewards = ", ".join(f"`{reward_text(spec)}`" for spec in config.reward) or "none (DMD only)"
    eval_rewards = ", ".join(f"`{reward_text(spec)}`" for spec in config.eval_reward) or "none"
    adapter = (
        f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha}" if has_lora else "full fine-tuning of the backbone"
    )
    rows = [
        ("teacher", f"`{config.pretrained_model_name_or_path}` ({family.name})"),
        ("student", adapter),
        ("student steps", str(config.num_student_steps)),
        ("resolution", "{}x{}".format(*config.image_size)),
        ("generator updates", f"{config.max_train_steps} (stage 1, DMD only: {config.cold_start_steps})"),
        ("rewards (stage 2, `name:weight:options`)", rewards),
        ("held-out rewards (logged only)", eval_rewards),
        ("reward-tilted DMD in stage 1", str(config.reward_tilt)),
        (
            "DynaDG / DynaRS",
            f"real-score LoRA scale {config.real_score_lora_scale} -> 0, re-noising Beta({config.renoise_beta_alpha}, "
            f"{config.renoise_beta_beta}) -> Beta(1, 1), over {config.dynamic_steps} steps",
        ),
        ("fake score", f"LoRA rank {config.fake_lora_rank}, scale {config.fake_score_lora_scale}"),
        ("fake-score updates per generator update", str(config.update_ratio)),
        ("real-score CFG", f"{config.real_guidance_scale} +- {config.guidance_scale_jitter}"),
        ("learning rates (student / fake)", f"{config.learning_rate:g} / {config.learning_rate_fake:g}"),
        ("batch size per process", str(config.train_batch_size)),
        ("mixed precision", str(config.mixed_precision or "no")),
        ("seed", str(config.seed)),
    ]
    if checkpoint_name:
        rows.append(("exported checkpoint", checkpoint_name))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    if info.rewards_trained:
        stages = (
            "Stage 1 distils the teacher with DMD (with the DynaDG and DynaRS cold-start schedules); stage 2 adds the "
            "reward losses to DMD, which keeps regularising the student towards the teacher's distribution."
        )
    else:
        stages = (
            "The student was distilled with DMD alone (with the DynaDG and DynaRS cold-start schedules): no reward "
            "loss was applied in this run."
        )
    return f"## Training recipe\n\n{stages}\n\n| setting | value |\n|---|---|\n{table}\n"


def reward_text(spec) -> str:
    """A reward of the recipe, given as CLI text or as a YAML mapping, in its CLI form (`clip:0.3:hinge=0.7`)."""
    return parse_reward_spec(spec).to_text()
