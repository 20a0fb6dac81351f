"""The engines a run may use, and gathering the full state of a sharded (FSDP2) run.

FSDP2 comes from accelerate (`accelerate_configs/fsdp2.yaml`): its `TRANSFORMER_BASED_WRAP` with no class list wraps
every submodule whose class is in the root's `_no_split_modules`, and [`DMDRTrainingModule`] exposes the backbone's
own list (SDXL: transformer, ResNet and up blocks; SD3: joint transformer blocks), so one file serves every family.
FSDP2 shards and reduces per parameter, so the frozen base never gets a gradient (tests/test_fsdp.py checks it);
FSDP1's flat parameters, where one trainable tensor in a unit made the whole unit carry gradients, were the reason to
wrap LoRA layers separately there.

DeepSpeed is refused (`check_engine_supported`): one optimizer holds both roles' parameter groups (one module, one
`prepare`), and ZeRO's flat gradient buffers hand the idle group zeros instead of `None`, so its Adam moments and
step count advance on the other role's updates (with TTUR 5 the student's first update is 0.52x its learning rate,
tests/test_engines.py). accelerate supports one DeepSpeed engine per model only experimentally; FSDP2 shards as much
and keeps each role's optimizer state its own.
"""

import os

import torch
from accelerate.utils import DistributedType


DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported: its ZeRO optimizer steps both networks' parameter groups on every update, which "
    "advances the idle network's Adam state (the student would train at about half its learning rate); launch with "
    "examples/train_dmdr/accelerate_configs/fsdp2.yaml (FSDP2 shards weights, gradients and optimizer state) or "
    "multi_gpu_ddp.yaml instead."
)


def check_engine_supported(distributed_type: DistributedType | None = None) -> None:
    """Refuse DeepSpeed, from the launch environment (`accelerate launch` sets `ACCELERATE_USE_DEEPSPEED` before the
    script runs, so this holds before any weight or engine loads) or from an accelerator's `distributed_type`."""
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched_with_deepspeed or distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(DEEPSPEED_REFUSED)


def is_fsdp2(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule)


def gather_full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model on the CPU of the main process; every process must call it.

    FSDP2 through torch's public `get_model_state_dict`; other engines through accelerate's `get_state_dict`.
    """
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return accelerator.get_state_dict(model)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded parameter (a DTensor under FSDP2); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def student_weights_from_module_state(module_state: dict[str, torch.Tensor], full: bool) -> dict[str, torch.Tensor]:
    """The student's weights from a full state dict of [`DMDRTrainingModule`] (as gathered from FSDP2's shards).

    Full mode: the `student_backbone.` entries without that prefix. LoRA mode: the `student` adapter's entries in PEFT
    format (the `backbone.` prefix and the adapter name removed: `...to_q.lora_A.student.weight` ->
    `...to_q.lora_A.weight`), as `peft.get_peft_model_state_dict` writes them.
    """
    if full:
        prefix = "student_backbone."
        return {k[len(prefix) :]: v.contiguous() for k, v in module_state.items() if k.startswith(prefix)}
    from .adapters import STUDENT_ADAPTER

    marker, prefix = f".{STUDENT_ADAPTER}.", "backbone."
    return {
        k[len(prefix) :].replace(marker, "."): v.contiguous()
        for k, v in module_state.items()
        if k.startswith(prefix) and marker in k and "lora_" in k
    }
