"""diffusers-dmdr: distil a multi-step diffusers text-to-image model into a 1-8 step student with DMDR.

DMDR (https://huggingface.co/papers/2511.13649) runs Distribution Matching Distillation jointly with reinforcement
learning from differentiable rewards, with two cold-start schedules (DynaDG, DynaRS).
"""

from .quiet_imports import import_bitsandbytes_offline, quiet_torchao_notices


# Before anything imports peft or diffusers' models (which import bitsandbytes and torchao): see quiet_imports.py.
import_bitsandbytes_offline()
quiet_torchao_notices()

from .config import DMDRConfig  # noqa: E402


__version__ = "0.1.0.dev0"

__all__ = ["DMDRConfig", "DMDRTrainer", "DMDRScheduler", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in accelerate and diffusers; import it only when asked for.
    if name == "DMDRTrainer":
        from .trainer import DMDRTrainer

        return DMDRTrainer
    if name == "DMDRScheduler":
        from .pipelines.scheduling_dmdr import DMDRScheduler

        return DMDRScheduler
    raise AttributeError(f"module 'diffusers_dmdr' has no attribute {name!r}")
