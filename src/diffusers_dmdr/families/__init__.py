"""Model families: how to load a teacher, encode prompts, call its backbone and place LoRA, per architecture.

A family is detected from the teacher's `model_index.json` before any weight is loaded, so an unsupported model
fails at once with a message naming the supported pipelines.

This package is the family registry: each family's facts are plain class attributes of its class, declared once in
its `families/<name>.py` next to its behaviour, and everything else reads them there (the config's `--family`
choices are the keys of `FAMILIES`):

- `name`, `pipeline_class_name`, `backbone_name`: the family key, its stock diffusers pipeline, the backbone component;
- `stock_route` / `backbone_class_name`: how `FewStepDMDRPipeline` drives the stock pipeline, read from
  `pipelines/pipeline_dmdr.py` (which ships standalone in exports, so it states them itself; a test ties the two);
- `card_tags` (model card), `comfy_lora_style` (the kohya / ComfyUI LoRA keys), `max_prompt_tokens` (SD3 128, the
  others the stock default), `default_guidance_embedding` (FLUX.1 [dev]'s 3.5), `grid_rule` (how the default student
  grid is made: the scheduler's `ddpm_student_grid` / `shifted_flow_grid`, or the teacher scheduler's own schedule),
  `supports_non_square` (preflight), `default_resolution`, the LoRA targets and the default backward simulation.

`tests/test_family_registry.py` checks every family's facts against diffusers and the pipeline file.
"""

from .base import ModelFamily, TeacherComponents, read_teacher_config
from .flux import Flux2KleinFamily, FluxFamily
from .qwenimage import QwenImageFamily
from .sd3 import SD3Family
from .sdxl import SD15Family, SDXLFamily
from .zimage import ZImageFamily


FAMILIES: dict[str, type[ModelFamily]] = {
    "sdxl": SDXLFamily,
    "sd15": SD15Family,
    "sd3": SD3Family,
    "flux": FluxFamily,
    "flux2": Flux2KleinFamily,
    "zimage": ZImageFamily,
    "qwenimage": QwenImageFamily,
}
FAMILY_BY_PIPELINE = {family.pipeline_class_name: name for name, family in FAMILIES.items()}


def detect_family(model_index: dict, source: str) -> str:
    """Family name from a teacher's `model_index.json` content (its `_class_name`)."""
    class_name = model_index.get("_class_name")
    if isinstance(class_name, list):
        class_name = class_name[-1]
    if class_name in FAMILY_BY_PIPELINE:
        return FAMILY_BY_PIPELINE[class_name]
    supported = ", ".join(f"{cls} ({name})" for cls, name in FAMILY_BY_PIPELINE.items())
    raise ValueError(
        f"{source} is a {class_name!r} pipeline, which diffusers-dmdr does not support. Supported teachers: "
        f"{supported}. Pass a checkpoint of one of these families."
    )


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of {sorted(FAMILIES)} or `auto`.")
    return FAMILIES[name]()


__all__ = [
    "FAMILIES",
    "Flux2KleinFamily",
    "FluxFamily",
    "ModelFamily",
    "QwenImageFamily",
    "SD15Family",
    "SD3Family",
    "SDXLFamily",
    "TeacherComponents",
    "ZImageFamily",
    "detect_family",
    "get_family",
    "read_teacher_config",
]
