"""FSDP2 sharding of the training module, as the shipped accelerate config does it, and gathering its full state.

The shipped `accelerate_configs/fsdp2.yaml` uses accelerate's `TRANSFORMER_BASED_WRAP` with no class list, so
accelerate wraps every submodule whose class is in the root's `_no_split_modules`; [`DMDRTrainingModule`] exposes the
backbone's own list (SDXL: transformer, ResNet and up blocks; SD3: joint transformer blocks). `shard_training_module`
applies the same policy with torch's `fully_shard` directly, for runs where accelerate does not take its FSDP path
(it takes it only on accelerators; the CPU test shards with gloo through this function).

Mixed frozen and trainable parameters cost no gradient memory under FSDP2: it shards and reduces per parameter, so
the frozen base never gets a gradient (the test checks it); FSDP1's flat parameters, where one trainable tensor in a
unit made the whole unit carry gradients, were the reason to wrap LoRA layers separately there.
"""

import torch


def sharding_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Submodules that become their own FSDP2 unit, innermost first (the root is sharded last, on its own)."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    units = [child for child in module.modules() if child is not module and type(child).__name__ in names]
    # Bottom-up: a nested unit must be sharded before the unit that contains it.
    depth = {id(m): name.count(".") for name, m in module.named_modules()}
    return sorted(units, key=lambda m: -depth[id(m)])


def shard_training_module(module: torch.nn.Module, mp_policy=None, mesh=None) -> torch.nn.Module:
    """Shard `module` in place with FSDP2 (`fully_shard`), one unit per `sharding_units` entry plus the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy(), "mesh": mesh}
    for unit in sharding_units(module):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def is_fsdp2(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule)


def gather_full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model on the CPU of the main process; every process must call it.

    FSDP2 through torch's public `get_model_state_dict`; DeepSpeed through accelerate's `get_state_dict`.
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
    """The student's weights from a full state dict of [`DMDRTrainingModule`] (as gathered by FSDP / DeepSpeed).

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
