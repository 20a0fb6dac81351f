"""Shared-base LoRA through PEFT: one frozen copy of the teacher serves teacher, fake score and (LoRA mode) student.

The student and the guidance network are two module objects whose frozen base tensors are the *same* tensors; each
carries one named adapter (`student`, `fake`). The real score is the guidance network with the fake adapter at a
DynaDG multiplier, and at multiplier 0 it is the teacher exactly (adapters disabled).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch


STUDENT_ADAPTER = "student"
FAKE_ADAPTER = "fake"


def copy_sharing_frozen_tensors(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `module` whose parameters and buffers are the original tensors (no extra memory)."""
    memo = {id(tensor): tensor for tensor in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def parse_target_modules(text: str | None, default: tuple[str, ...]) -> list[str]:
    """Comma-separated module names (`"to_q,to_k"`) as a list; `None` or blank gives the family's `default`."""
    modules = [name.strip() for name in (text or "").split(",") if name.strip()]
    return modules or list(default)


def add_lora_adapter(
    model: torch.nn.Module, adapter_name: str, rank: int, alpha: float | None, target_modules: list[str]
) -> None:
    """Add a LoRA adapter (B initialised to zero, so the model is unchanged until trained) and make it active."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    model.add_adapter(config, adapter_name=adapter_name)


def _lora_layers(model: torch.nn.Module, adapter_name: str):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
            yield module


@contextmanager
def lora_scale(model: torch.nn.Module, adapter_name: str, scale: float) -> Iterator[None]:
    """Run `model` with adapter `adapter_name` multiplied by `scale`; `scale == 0` disables adapters (exact base)."""
    if scale == 0:
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
        return
    layers = list(_lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter named {adapter_name!r}.")
    original = [layer.scaling[adapter_name] for layer in layers]
    for layer, value in zip(layers, original, strict=True):
        layer.scaling[adapter_name] = value * scale
    try:
        yield
    finally:
        for layer, value in zip(layers, original, strict=True):
            layer.scaling[adapter_name] = value


@contextmanager
def swapped_weights(parameters: list[torch.nn.Parameter], replacement: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily copy `replacement` into `parameters` (no grad), restoring the originals afterwards: runs a frozen
    reference version of a network (the anchor) without a second copy of its frozen base."""
    with torch.no_grad():
        originals = [parameter.detach().clone() for parameter in parameters]
        for parameter, value in zip(parameters, replacement, strict=True):
            parameter.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in zip(parameters, originals, strict=True):
                parameter.copy_(value)


def adapter_state_dict(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT format (keys without the adapter name), detached and contiguous."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {key: value.detach().contiguous() for key, value in state.items()}


def load_adapter_state_dict(model: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Load PEFT-format weights into `adapter_name`; any unexpected or missing LoRA key is an error."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"Adapter {adapter_name!r}: unexpected keys in the checkpoint, e.g. {unexpected[:3]}.")
    expected = set(adapter_state_dict(model, adapter_name))
    missing = expected - set(state_dict)
    if missing:
        raise ValueError(
            f"Adapter {adapter_name!r}: the checkpoint lacks {len(missing)} keys, e.g. {sorted(missing)[:3]}."
        )


def _cast_if_needed(module: torch.nn.Module, dtype: torch.dtype) -> None:
    # Casting only when needed keeps diffusers from warning about a no-op `.to(dtype)`.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def build_student_and_guidance(
    base: torch.nn.Module,
    training_mode: str,
    weight_dtype: torch.dtype,
    student_lora: dict,
    fake_lora: dict,
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the student and the guidance network (fake + real score) around one frozen base.

    Args:
        base: the teacher's backbone in float32 (it becomes the frozen base, cast to `weight_dtype`).
        training_mode: `lora` (student adapter on the shared base) or `full` (a trainable float32 copy).
        weight_dtype: dtype of every frozen tensor.
        student_lora, fake_lora: `add_lora_adapter` keyword arguments (`rank`, `alpha`, `target_modules`).
        seed: seeds the LoRA A initialisation, so that a run is a function of its seed alone.

    Returns:
        `(student, guidance)`: trainable parameters in float32, frozen ones in `weight_dtype`.
    """
    base.requires_grad_(False)
    if training_mode == "full":
        # The full student starts as an exact float32 copy of the teacher and owns its weights.
        student = copy.deepcopy(base)
        _cast_if_needed(student, torch.float32)
        student.requires_grad_(True)
        _cast_if_needed(base, weight_dtype)
        guidance = base
    else:
        _cast_if_needed(base, weight_dtype)
        student = base
        guidance = copy_sharing_frozen_tensors(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if training_mode != "full":
            add_lora_adapter(student, STUDENT_ADAPTER, **student_lora)
        add_lora_adapter(guidance, FAKE_ADAPTER, **fake_lora)
    # LoRA weights train in float32 whatever the frozen dtype (diffusers' `cast_training_params`).
    for model in (student, guidance):
        for parameter in trainable_parameters(model):
            parameter.data = parameter.data.to(torch.float32)
    return student, guidance
