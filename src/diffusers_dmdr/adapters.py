"""Shared-base LoRA through PEFT: one frozen copy of the teacher serves teacher, fake score and (LoRA mode) student.

One backbone carries two named adapters, `student` and `fake` (full mode: `fake` only, beside a trainable student
copy). An [`AdapterRouter`] activates one adapter at a multiplier per forward pass: the student is the `student`
adapter at 1, the fake score the `fake` adapter at `lambda_f`, the real score the `fake` adapter at the DynaDG
multiplier, and at multiplier 0 every adapter is off, which is the teacher exactly.
"""

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


STUDENT_ADAPTER = "student"
FAKE_ADAPTER = "fake"


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
    dropout: float = 0.0,
) -> None:
    """Add a LoRA adapter (B initialised to zero, so the model is unchanged until trained) and make it active;
    `dropout` is PEFT's `lora_dropout` on the adapter's input (active in train mode only)."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {sorted(LORA_INITS)}, got {init!r}.")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        init_lora_weights=LORA_INITS[init],
        lora_dropout=dropout,
    )
    with warnings.catch_warnings():
        # The shared base carries two adapters on purpose (student and fake score).
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        model.add_adapter(config, adapter_name=adapter_name)


def lora_layers(model: torch.nn.Module) -> list:
    """Every PEFT tuner layer of `model` (each wraps one frozen base layer and holds its adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _set_active_adapter(layer, adapter_name: str | None) -> None:
    """Make `adapter_name` the only active adapter of one PEFT layer, or disable its adapters (`None`).

    PEFT's public `set_adapter` / `enable_adapters` also flip `requires_grad` of every adapter weight. The training
    module switches adapters several times per step; flipping `requires_grad` would break DDP's reducer and FSDP2's
    cached mixed-precision dtypes, so this sets the two attributes those methods set and nothing else.
    `tests/test_training_module.py` checks them against PEFT's public properties.
    """
    if adapter_name is not None:
        layer._active_adapter = [adapter_name]
    layer._disable_adapters = adapter_name is None


class AdapterRouter:
    """Routes a backbone carrying several named LoRA adapters: one adapter active at a multiplier, or none.

    The multiplier scales each layer's own `alpha / r`, recorded when the router is built; multiplier 0 disables every
    adapter, which makes the backbone the frozen base exactly (the teacher).
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = lora_layers(model)
        self.unit_scaling = [dict(layer.scaling) for layer in self.layers]

    def route(self, adapter_name: str | None, scale: float = 1.0) -> None:
        """Activate only `adapter_name` at `scale`; `None` or `scale == 0` disables adapters."""
        if adapter_name is not None and scale != 0 and not any(adapter_name in s for s in self.unit_scaling):
            raise ValueError(f"The backbone has no LoRA adapter named {adapter_name!r}.")
        active = None if scale == 0 else adapter_name
        for layer, unit in zip(self.layers, self.unit_scaling, strict=True):
            _set_active_adapter(layer, active)
            if active in unit:
                layer.scaling[active] = unit[active] * scale


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


def build_training_backbones(
    base: torch.nn.Module,
    training_mode: str,
    weight_dtype: torch.dtype,
    student_lora: dict,
    fake_lora: dict,
    seed: int = 0,
    student_backbone: torch.nn.Module | None = None,
    student_init_path: str | None = None,
    init: str = "gaussian",
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Put the adapters on the one frozen base: returns `(backbone, student_backbone)`.

    LoRA mode: `backbone` carries both adapters, `student` and `fake`, and `student_backbone` is `None`. Full mode:
    `backbone` carries the `fake` adapter and `student_backbone` is the trainable float32 student.

    Args:
        base: the teacher's backbone, loaded in `weight_dtype` (cast here only if it is not).
        training_mode: `lora` or `full`.
        weight_dtype: dtype of every frozen tensor.
        student_lora, fake_lora: `add_lora_adapter` keyword arguments (`rank`, `alpha`, `target_modules`, optionally
            `dropout`).
        seed: seeds the LoRA A initialisation, so that a run is a function of its seed alone.
        student_backbone: full mode only: the student's own copy of the backbone, ideally loaded in float32 from the
            checkpoint (a copy of `base` is made when it is not given).
        init: `gaussian` (released DMDR) or `kaiming` (PEFT default) initialisation of both adapters' A matrices.
        student_init_path: initialise the student only (see [`load_student_init`]); the base stays the teacher.

    Returns:
        `(backbone, student_backbone)`: trainable parameters in float32, frozen ones in `weight_dtype`.
    """
    base.requires_grad_(False)
    if training_mode == "full":
        if student_backbone is None:
            student_backbone = copy.deepcopy(base)
        _cast_if_needed(student_backbone, torch.float32)
        student_backbone.requires_grad_(True)
    _cast_if_needed(base, weight_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if training_mode != "full":
            add_lora_adapter(base, STUDENT_ADAPTER, **student_lora, init=init)
        add_lora_adapter(base, FAKE_ADAPTER, **fake_lora, init=init)
    if student_init_path is not None:
        load_student_init(base if training_mode != "full" else student_backbone, training_mode, student_init_path)
    # `add_adapter` activates only the newest adapter and freezes the others: both must train.
    for name, parameter in base.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
            # LoRA weights train in float32 whatever the frozen dtype (diffusers' `cast_training_params`).
            parameter.data = parameter.data.to(torch.float32)
    return base, student_backbone


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
