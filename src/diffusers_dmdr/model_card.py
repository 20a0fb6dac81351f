"""The model card of an export: YAML metadata, samples, loading snippets, sampler, recipe and limitations.

Everything the card says comes from one [`ModelCardInfo`]; [`make_model_card`] turns it into a
`huggingface_hub.ModelCard` without any Hub request (the teacher's licence is read from its folder or the local Hub
cache, and from the Hub only for an export about to be pushed).
"""

import logging
from dataclasses import dataclass, field
from importlib import resources
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
CARD_TEMPLATE = "model_card.md.jinja"
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
# Body: rendered from templates/model_card.md.jinja
# ----------------------------------------------------------------------------------------------------------------
def _card_body(info: ModelCardInfo) -> str:
    import jinja2

    template_text = (resources.files(__package__) / "templates" / CARD_TEMPLATE).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    return environment.from_string(template_text).render(**_card_context(info))


def _card_context(info: ModelCardInfo) -> dict:
    """What the template prints, computed: everything that is arithmetic or a lookup, no prose."""
    config, family, scheduler = info.config, info.family, info.scheduler
    timesteps = list(scheduler.config.training_timesteps)
    recipe, no_recipe_reason = stock_scheduler_recipe(scheduler)
    size = ""
    if config.image_size != (family.default_resolution,) * 2:
        size = f", height={config.image_size[0]}, width={config.image_size[1]}"
    recipe_kwargs = {}
    if recipe is not None:
        # Guidance off (or FLUX.1's trained embedding) and the trained prompt length: the call defaults
        # FewStepDMDRPipeline gives this stock pipeline; the prompt by name (Flux2KleinPipeline takes an image first).
        call_defaults = {**family.stock_route.call_defaults, **family.export_call_defaults(config, None)}
        recipe_kwargs = {
            "from_config": _keyword_text(recipe.get("from_config_kwargs", {})),
            "call": _keyword_text({**recipe.get("call_kwargs", {}), **call_defaults}),
        }
    metric_rows = [
        (name, value)
        for name, value in sorted(info.metrics.items())
        if isinstance(value, int | float) and name.startswith(("reward/", "heldout_reward/", "loss", "monitor/"))
    ]
    return {
        "info": info,
        "config": config,
        "family": family,
        "scheduler": scheduler,
        "paper_url": PAPER_URL,
        "local_name": Path(config.pretrained_model_name_or_path).name,
        "timesteps": timesteps,
        "num_steps": len(timesteps),
        "prompt": (config.validation_prompts or [DEFAULT_SNIPPET_PROMPT])[0],
        "size": size,
        "backbone": family.backbone_name,
        "backbone_class": info.backbone_class_name or family.backbone_class_name,
        "stock": family.pipeline_class_name,
        "recipe": recipe,
        "scheduler_class": recipe["class_name"] if recipe else None,
        "recipe_kwargs": recipe_kwargs,
        "no_recipe_reason": no_recipe_reason,
        "comfy": _comfy_settings(scheduler, family) if info.has_comfy_lora else None,
        "rewards": ", ".join(f"`{reward_text(spec)}`" for spec in config.reward),
        "eval_rewards": ", ".join(f"`{reward_text(spec)}`" for spec in config.eval_reward),
        "metrics": metric_rows,
        "files": {
            "lora": LORA_WEIGHT_NAME,
            "kohya": KOHYA_LORA_WEIGHT_NAME,
            "samples": SAMPLES_FILE,
            "pipeline_module": PIPELINE_MODULE,
            "pipeline_class": PIPELINE_CLASS,
            "scheduler_module": SCHEDULER_MODULE,
            "scheduler_class": SCHEDULER_CLASS,
        },
    }


def _keyword_text(kwargs: dict) -> str:
    """`, key=value` for each keyword, values as Python literals (the snippets' call arguments)."""
    return "".join(f", {key}={value!r}" for key, value in kwargs.items())


def stock_scheduler_recipe(scheduler: DMDRScheduler) -> tuple[dict | None, str | None]:
    """`(recipe, None)` from [`DMDRScheduler.stock_scheduler_recipe`] (`class_name`, `from_config_kwargs`,
    `call_kwargs`, `exact`, `note`), or `(None, reason)` when no stock diffusers scheduler runs this sampler."""
    recipe = scheduler.stock_scheduler_recipe()
    if recipe.get("class_name"):
        return recipe, None
    return None, recipe.get("note") or "the trained sampler is not one a stock scheduler runs"


def grid_shift(scheduler: DMDRScheduler) -> float | None:
    """The shift a flow grid was built with (informative config key `grid_shift`, formerly `shift`)."""
    config = scheduler.config
    return config.get("grid_shift", config.get("shift"))


def _comfy_settings(scheduler: DMDRScheduler, family: ModelFamily) -> dict:
    """The ComfyUI sampler and schedule closest to the trained sampler."""
    timesteps = [int(round(t)) for t in scheduler.config.training_timesteps]
    num_steps = len(timesteps)
    # ComfyUI's `lcm` sampler re-noises the clean prediction with fresh noise (the DMD sampler); `euler` is the ODE.
    sampler = "lcm" if not scheduler.config.deterministic and num_steps > 1 else "euler"
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
    return {"sampler": sampler, "schedule": schedule}


def reward_text(spec) -> str:
    """A reward of the recipe, given as CLI text or as a YAML mapping, in its CLI form (`clip:0.3:hinge=0.7`)."""
    return parse_reward_spec(spec).to_text()
