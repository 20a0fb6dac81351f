"""Test-only: accelerate's own FSDP2 path on CPU processes (gloo).

accelerate takes its FSDP path only on accelerators: on CPU, `AcceleratorState` reports `MULTI_CPU` and ignores the
FSDP plugin that `accelerate launch --config_file fsdp2.yaml` describes in the `FSDP_*` environment. `fsdp2_accelerator`
builds the `Accelerator` on CPU and then does what `AcceleratorState.__init__` does for a multi-GPU FSDP run
(accelerate/state.py: `distributed_type = FSDP`, `fsdp_plugin.set_mixed_precision(...)`, `fsdp_plugin = plugin`), on
both shared states (`save_state` reads `PartialState`'s). From there `prepare`, `backward`, `clip_grad_norm_`,
`save_state` / `load_state` and `get_state_dict` are accelerate's own FSDP2 code.

This is the only place in the suite that writes accelerate's state; `check_fsdp2_switch` (called by the workers after
`prepare`, asserted by tests/test_fsdp.py) fails loudly when accelerate changes what the switch relies on.
"""

import os

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def fsdp2_accelerator(**accelerator_kwargs) -> Accelerator:
    """An `Accelerator` on CPU switched to accelerate's FSDP2 path, with the plugin the launch environment describes.

    Run under `ACCELERATE_USE_CPU=true accelerate launch --config_file .../fsdp2.yaml --num_processes 2 ...`: the
    plugin is built from the same `FSDP_*` variables a GPU launch of that file sets, as `Accelerator.__init__` does.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or os.environ.get("FSDP_VERSION") != "2":
        raise RuntimeError(
            "Launch with `accelerate launch --config_file fsdp2.yaml` (sets ACCELERATE_USE_FSDP, FSDP_*)."
        )
    for state_class, attribute in ((PartialState, "distributed_type"), (AcceleratorState, "fsdp_plugin")):
        if attribute not in state_class._known_attrs:
            raise RuntimeError(f"accelerate changed: {state_class.__name__} has no `{attribute}`; update this switch.")
    accelerator = Accelerator(cpu=True, **accelerator_kwargs)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        return accelerator  # switched by an earlier call: accelerate's state is process-wide
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"Expected a MULTI_CPU launch before the switch, got {accelerator.distributed_type}.")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* environment, as Accelerator.__init__ does
    state = AcceleratorState()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise RuntimeError("accelerate changed: the switched Accelerator does not report FSDP2.")
    return accelerator


def check_fsdp2_switch(accelerator: Accelerator, model) -> dict:
    """What the switch must have achieved once `prepare` ran: accelerate's FSDP2 wrapping, sharded parameters, the
    plugin's settings. Returned as JSON-able facts for the test to assert (it fails loudly when accelerate changes)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    return {
        "distributed_type": str(accelerator.distributed_type),
        "partial_state_distributed_type": str(PartialState().distributed_type),
        "is_fsdp2": bool(accelerator.is_fsdp2),
        "model_is_fsdp_module": isinstance(model, FSDPModule),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        # fsdp2.yaml's TRANSFORMER_BASED_WRAP: one unit per block the backbone lists, plus the root (`fully_shard`
        # swaps a unit's class for a subclass `FSDP<name>`: the block's own class is in its MRO).
        "backbone_blocks": sum(
            any(cls.__name__ in blocks for cls in type(m).__mro__) for m in model.modules() if m is not model
        ),
        "all_parameters_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "state_dict_type": str(plugin.state_dict_type),
        "auto_wrap_policy": getattr(getattr(plugin.auto_wrap_policy, "func", None), "__name__", None),
        "reshard_after_forward": plugin.reshard_after_forward,
        "param_dtype": str(getattr(policy, "param_dtype", None)),
        "reduce_dtype": str(getattr(policy, "reduce_dtype", None)),
    }
