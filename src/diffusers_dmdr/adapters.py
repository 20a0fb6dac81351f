"""Shared-base LoRA through PEFT: one frozen copy of the teacher serves teacher, fake score and (LoRA mode) student.

The student and the guidance network are two module objects whose frozen base tensors are the *same* tensors; each
carries one named adapter (`student`, `fake`). The real score is the guidance network with the fake adapter at a
DynaDG multiplier, and at multiplier 0 it is the teacher exactly (adapters disabled).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


# `--init_lora_weights` -> PEFT's `init_lora_weights`: `gaussian` draws A ~ N(0, 1/r^2) (std 1/r, the released DMDR
# code), PEFT's default `True` is Kaiming-uniform. B is zero in both, so a new adapter leaves the model unchanged.
LORA_INITS = {"gaussian": "gaussian", "kaiming": True}


def add_lora_adapter(
    model: torch.nn.Module,
    adapter_name: str,
    rank: int,
    alpha: float | None,
    target_modules: list[str],
    init: str = "gaussian",
) -> None:
    """Add a LoRA adapter (B initialised to zero, so the model is unchanged until trained) and make it active."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {sorted(LORA_INITS)}, got {init!r}.")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        init_lora_weights=LORA_INITS[init],
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
    student_init_path: str | None = None,
    init: str = "gaussian",
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Build the student and the guidance network (fake + real score) around one frozen base.

    Args:
        base: the teacher's backbone in float32 (it becomes the frozen base, cast to `weight_dtype`).
        training_mode: `lora` (student adapter on the shared base) or `full` (a trainable float32 copy).
        weight_dtype: dtype of every frozen tensor.
        student_lora, fake_lora: `add_lora_adapter` keyword arguments (`rank`, `alpha`, `target_modules`).
        seed: seeds the LoRA A initialisation, so that a run is a function of its seed alone.
        init: `gaussian` (released DMDR) or `kaiming` (PEFT default) initialisation of both adapters' A matrices.
        student_init_path: initialise the student only (see [`load_student_init`]); the base stays the teacher.

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
            add_lora_adapter(student, STUDENT_ADAPTER, **student_lora, init=init)
        add_lora_adapter(guidance, FAKE_ADAPTER, **fake_lora, init=init)
    if student_init_path is not None:
        load_student_init(student, training_mode, student_init_path)
    # LoRA weights train in float32 whatever the frozen dtype (diffusers' `cast_training_params`).
    for model in (student, guidance):
        for parameter in trainable_parameters(model):
            parameter.data = parameter.data.to(torch.float32)
    return student, guidance


# ----------------------------------------------------------------------------------------------------------------
# --student_init_path: initial weights of the student only
# ----------------------------------------------------------------------------------------------------------------
BACKBONE_SUBFOLDERS = ("unet", "transformer")
# Diffusers' LoRA files prefix each key with the component (`unet.`, `transformer.`); PEFT's do not.
_LORA_KEY_PREFIXES = ("unet.", "transformer.", "base_model.model.")


def student_init_files(path: str) -> tuple[str, list[Path]]:
    """What `--student_init_path` holds, read from file names and safetensors headers only (no weights):
    `("lora", [file])`, `("backbone", [file])` or `("backbone", shards)`.

    Raises `FileNotFoundError` / `ValueError` that name the fix for a missing path, a pickle file or a folder without
    safetensors weights.
    """
    from safetensors import safe_open

    location = Path(path).expanduser()
    if location.is_dir():
        for subfolder in BACKBONE_SUBFOLDERS:
            if (location / subfolder / "config.json").is_file():
                location = location / subfolder
                break
        files = sorted(location.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"--student_init_path {path} holds no .safetensors weights (a backbone folder needs config.json and "
                "diffusion_pytorch_model*.safetensors; convert .bin files with `save_pretrained(folder)`)."
            )
    elif location.is_file():
        if location.suffix != ".safetensors":
            raise ValueError(
                f"--student_init_path {path}: only .safetensors files are loaded (no pickle); convert it, e.g. "
                "`safetensors.torch.save_file(torch.load(file, weights_only=True), 'unet.safetensors')`."
            )
        files = [location]
    else:
        raise FileNotFoundError(
            f"--student_init_path {path} does not exist; give a backbone folder, a backbone .safetensors file or a "
            "LoRA .safetensors file."
        )
    with safe_open(str(files[0]), framework="pt") as handle:
        is_lora = any("lora_" in key for key in handle.keys())
    return ("lora" if is_lora else "backbone"), files


def lora_rank_of_file(file: Path) -> int:
    """The rank of a LoRA file: the first dimension of its `lora_A` matrices (read from the header)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        ranks = {handle.get_slice(key).get_shape()[0] for key in handle.keys() if "lora_A" in key}
    if len(ranks) != 1:
        raise ValueError(f"--student_init_path {file}: expected one LoRA rank, found {sorted(ranks) or 'none'}.")
    return ranks.pop()


def load_student_init(student: torch.nn.Module, training_mode: str, path: str) -> None:
    """Load `--student_init_path` into the student: a backbone's weights into the full copy (strict: every key and
    shape must match the teacher's architecture), or a PEFT LoRA into the `student` adapter."""
    from safetensors.torch import load_file

    kind, files = student_init_files(path)
    if kind == "lora":
        if training_mode != "lora":
            raise ValueError(f"--student_init_path {path} is a LoRA: it initialises --training_mode lora students.")
        state = {}
        for key, value in load_file(files[0]).items():
            for prefix in _LORA_KEY_PREFIXES:
                key = key.removeprefix(prefix)
            state[key.replace(f".{STUDENT_ADAPTER}.", ".")] = value
        load_adapter_state_dict(student, STUDENT_ADAPTER, state)
        return
    if training_mode != "full":
        raise ValueError(
            f"--student_init_path {path} is a full backbone: use --training_mode full (a LoRA student shares the "
            "teacher's weights, so it cannot start from other ones)."
        )
    state = {}
    for file in files:
        state.update(load_file(file))
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"--student_init_path {path} does not fit the teacher's {type(student).__name__}: {error}"
        ) from error
