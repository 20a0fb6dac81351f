"""Model families: how to load a teacher, encode prompts, call its backbone and place LoRA, per architecture.

A family is detected from the teacher's `model_index.json` before any weight is loaded, so an unsupported model
fails at once with a message naming the supported pipelines.
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
