"""The memory plan of a run: bytes of weights, gradients and optimizer states, from the component configs alone.

Every component (text encoders, VAE, backbone, the reward autoencoder) is instantiated on the meta device from its
`config.json`, so parameter counts are exact and no weight is read; the LoRA adapters are added to the meta backbone
with the run's ranks and targets, so adapter counts are exact too. Activations are *not* included: they depend on
resolution, batch size, checkpointing and attention kernels (see `docs/benchmarks.md` for measured figures).

The arithmetic, per tensor of `n` elements (floating tensors are counted in the dtype they are cast to, integer
buffers in their own dtype):

- frozen weights: `n * itemsize(training dtype)` (text encoders, VAE, the shared backbone base; an fp16 VAE whose
  config asks for `force_upcast` stays float32, as the trainer keeps it);
- trainable parameters and their gradients: `4 n` bytes each (float32 whatever the frozen dtype);
- `torch.optim.AdamW`: `exp_avg` and `exp_avg_sq` in float32 plus a float32 `step` scalar per tensor: `8 n + 4`;
- `bitsandbytes.optim.AdamW8bit` (bitsandbytes >= 0.50): a tensor with `n >= 4096` (its `min_8bit_size`) keeps two
  uint8 states plus two float32 absmax values per block of 256 elements: `2 n + 8 ceil(n / 256)`; a smaller tensor
  keeps two float32 states: `8 n`; the optimizer holds two 256-entry float32 quantisation maps (2 KiB), shared by
  its tensors (one optimizer with a parameter group per network, as the trainer builds it);
- FSDP2 with `N` processes (`fully_shard` of the training module: the backbone base, the adapters, a full student):
  each parameter is split on dim 0 into `ceil(d0 / N)`-row shards (the last rank's shard padded), so one process holds
  `ceil(d0 / N) * n / d0` elements of it, and its gradients and optimizer states are sharded alike; buffers stay whole; the text
  encoders and autoencoders are outside the training module and stay replicated. Unsharded per-block weights and
  gradients that FSDP materialises transiently during forward/backward are activations-like and not included.
"""

import math
from dataclasses import asdict, dataclass, field

import torch

from .families.base import TEXT_ENCODER_NAMES, ModelFamily, read_component_config
from .hub_cache import hub_cache_kwargs
from .utils import resolve_dtype


GIB = 1024**3
# bitsandbytes' AdamW8bit: tensors below `min_8bit_size` elements keep float32 states; absmax per 256-element block.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_QMAP_BYTES = 2 * 256 * 4


# ----------------------------------------------------------------------------------------------------------------
# Pure arithmetic on tensor shapes
# ----------------------------------------------------------------------------------------------------------------
def shard_numel(shape: tuple[int, ...], num_processes: int) -> int:
    """Elements one process holds of a tensor of `shape` under FSDP2's dim-0 sharding: `ceil(d0 / N) * prod(rest)`
    (a 0-dim tensor is replicated)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / num_processes) * math.prod(shape[1:])


def tensor_bytes(shapes: list[tuple[int, ...]], itemsize: int, num_processes: int = 1) -> int:
    """Bytes of tensors of `shapes` at `itemsize` bytes per element, per process of `num_processes` FSDP2 shards."""
    return sum(shard_numel(shape, num_processes) * itemsize for shape in shapes)


def adamw_state_bytes(shapes: list[tuple[int, ...]], num_processes: int = 1) -> int:
    """`torch.optim.AdamW`: two float32 moments per element plus a float32 `step` scalar per tensor."""
    return sum(8 * shard_numel(shape, num_processes) + 4 for shape in shapes)


def adamw8bit_state_bytes(shapes: list[tuple[int, ...]], num_processes: int = 1) -> int:
    """`bitsandbytes.optim.AdamW8bit`: uint8 moments and float32 block absmax for tensors of >= 4096 elements,
    float32 moments below that (the optimizer's shared quantisation maps: `adamw8bit_shared_bytes`)."""
    total = 0
    for shape in shapes:
        n = shard_numel(shape, num_processes)
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 8 * math.ceil(n / BNB_BLOCKSIZE)
    return total


def adamw8bit_shared_bytes(shapes: list[tuple[int, ...]], num_processes: int = 1) -> int:
    """The two 256-entry float32 quantisation maps one AdamW8bit optimizer shares between its quantised tensors."""
    quantised = any(shard_numel(shape, num_processes) >= BNB_MIN_8BIT_SIZE for shape in shapes)
    return BNB_QMAP_BYTES if quantised else 0


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FrozenComponent:
    """A frozen module: its parameter count and bytes on the device (per process: replicated, or sharded)."""

    name: str
    num_parameters: int
    dtype: str
    bytes: int
    bytes_per_process_fsdp: int
    on_device: bool = True


@dataclass
class TrainableNetwork:
    """What one network trains: parameters (float32), their gradients and the optimizer's states, in bytes."""

    name: str
    num_parameters: int
    num_tensors: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    parameter_bytes_fsdp: int
    gradient_bytes_fsdp: int
    optimizer_bytes_fsdp: int
    # A full student owns fp32 copies of the backbone's buffers (frozen, not trained).
    buffer_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.buffer_bytes

    @property
    def total_bytes_fsdp(self) -> int:
        return self.parameter_bytes_fsdp + self.gradient_bytes_fsdp + self.optimizer_bytes_fsdp + self.buffer_bytes


@dataclass
class MemoryPlan:
    """Bytes per process of a DMDR run's weights, gradients and optimizer states (activations not included).

    `frozen` lists every frozen module with whether it sits on the device (`on_device=False`: text encoders kept on
    the host because prompt embeddings are cached or the encoders are offloaded); `networks` holds the student and
    the fake score. `num_processes` is the FSDP2 process count of the `*_fsdp` figures.
    """

    family: str
    training_mode: str
    training_dtype: str
    optimizer: str
    num_processes: int
    text_encoders: str
    frozen: list[FrozenComponent] = field(default_factory=list)
    networks: list[TrainableNetwork] = field(default_factory=list)
    # State the one optimizer shares between its tensors (AdamW8bit's quantisation maps), per process.
    optimizer_shared_bytes: int = 0

    def frozen_bytes(self, fsdp: bool = False) -> int:
        return sum(c.bytes_per_process_fsdp if fsdp else c.bytes for c in self.frozen if c.on_device)

    def host_bytes(self) -> int:
        return sum(c.bytes for c in self.frozen if not c.on_device)

    def total_bytes(self, fsdp: bool = False) -> int:
        """Device bytes per process: frozen modules on the device plus every network's parameters, gradients and
        optimizer states (both networks' gradients counted at once: an upper bound of what is live)."""
        networks = sum(n.total_bytes_fsdp if fsdp else n.total_bytes for n in self.networks)
        return self.frozen_bytes(fsdp) + networks + self.optimizer_shared_bytes

    def to_dict(self) -> dict:
        values = asdict(self)
        values["totals"] = {
            "frozen_bytes": self.frozen_bytes(),
            "host_bytes": self.host_bytes(),
            "total_bytes": self.total_bytes(),
            "total_bytes_per_process_fsdp": self.total_bytes(fsdp=True),
        }
        return values

    def format_table(self) -> str:
        """A human-readable table in GiB: one process, and per process under FSDP2 with `num_processes`."""
        fsdp_header = f"GiB/proc FSDP2 N={self.num_processes}"
        rows = [("", "parameters", "dtype", "GiB (1 process)", fsdp_header)]

        def gib(value: int) -> str:
            return f"{value / GIB:.3f}"

        for component in self.frozen:
            where = "" if component.on_device else " [host]"
            fsdp = gib(component.bytes_per_process_fsdp) if component.on_device else "-"
            rows.append(
                (
                    f"frozen {component.name}{where}",
                    f"{component.num_parameters:,}",
                    component.dtype,
                    gib(component.bytes),
                    fsdp,
                )
            )
        for network in self.networks:
            rows.append(
                (
                    f"{network.name}: trainable",
                    f"{network.num_parameters:,}",
                    "fp32",
                    gib(network.parameter_bytes),
                    gib(network.parameter_bytes_fsdp),
                )
            )
            rows.append(
                (
                    f"{network.name}: gradients",
                    "",
                    "fp32",
                    gib(network.gradient_bytes),
                    gib(network.gradient_bytes_fsdp),
                )
            )
            rows.append(
                (
                    f"{network.name}: {self.optimizer} states",
                    "",
                    "",
                    gib(network.optimizer_bytes),
                    gib(network.optimizer_bytes_fsdp),
                )
            )
            if network.buffer_bytes:
                rows.append((f"{network.name}: own buffers", "", "fp32", gib(network.buffer_bytes), "-"))
        if self.optimizer_shared_bytes:
            shared = gib(self.optimizer_shared_bytes)
            rows.append((f"{self.optimizer} quantisation maps", "", "fp32", shared, shared))
        rows.append(("total on the device", "", "", gib(self.total_bytes()), gib(self.total_bytes(fsdp=True))))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            f"Memory plan: {self.family}, {self.training_mode} mode, frozen weights in {self.training_dtype}, "
            f"{self.optimizer}, text encoders {self.text_encoders}. Weights, gradients and optimizer states only: "
            "activations (and reward models) are NOT included."
        ]
        for index, row in enumerate(rows):
            lines.append(
                "  ".join(
                    cell.ljust(width) if i == 0 else cell.rjust(width)
                    for i, (cell, width) in enumerate(zip(row, widths, strict=True))
                )
            )
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        if self.host_bytes():
            lines.append(f"(on the host, not the device: {gib(self.host_bytes())} GiB of text encoders)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Meta-device models from configs
# ----------------------------------------------------------------------------------------------------------------
# The only libraries whose classes a teacher's `model_index.json` may name for the plan: importing any other module
# a downloaded folder names would run its code (diffusers itself refuses such a folder without `trust_remote_code`).
META_MODEL_LIBRARIES = ("diffusers", "transformers")


def meta_model(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """Instantiate `library.class_name` (diffusers or transformers) from its config dict on the meta device.

    Raises:
        `ValueError`: `library` is neither diffusers nor transformers (nothing is imported), or it has no model class
        `class_name`.
    """
    import importlib

    if library not in META_MODEL_LIBRARIES:
        raise ValueError(
            f"model_index.json names the class {class_name!r} from the module {library!r}: only diffusers and "
            "transformers classes are loaded (a module a downloaded folder names is never imported). Use a teacher "
            "whose components are diffusers/transformers models."
        )
    module = importlib.import_module(library)
    model_class = getattr(module, class_name, None)
    if (
        model_class is None
        or not isinstance(model_class, type)
        or not hasattr(model_class, "from_config" if library == "diffusers" else "config_class")
    ):
        raise ValueError(
            f"{library} has no model class {class_name!r} (named in model_index.json); upgrade {library}."
        )
    with torch.device("meta"):
        if library == "transformers":
            return model_class(model_class.config_class.from_dict(config))
        return model_class.from_config(config)


def _frozen_component(name, module, dtype: torch.dtype, num_processes: int, sharded: bool, on_device: bool = True):
    def size(tensors, processes):
        return sum(
            shard_numel(tuple(t.shape), processes)
            * (dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
            for t in tensors
        )

    parameters, buffers = list(module.parameters()), list(module.buffers())
    # FSDP2 shards parameters only; buffers (SD3's positional table, CLIP's position ids) stay whole on every process.
    return FrozenComponent(
        name=name,
        num_parameters=sum(p.numel() for p in parameters),
        dtype=str(dtype).removeprefix("torch."),
        bytes=size(parameters, 1) + size(buffers, 1),
        bytes_per_process_fsdp=size(parameters, num_processes if sharded else 1) + size(buffers, 1),
        on_device=on_device,
    )


def _trainable_network(name, shapes: list[tuple[int, ...]], use_8bit_adam: bool, num_processes: int, buffer_bytes=0):
    state_bytes = adamw8bit_state_bytes if use_8bit_adam else adamw_state_bytes
    return TrainableNetwork(
        name=name,
        num_parameters=sum(math.prod(shape) for shape in shapes),
        num_tensors=len(shapes),
        parameter_bytes=tensor_bytes(shapes, 4),
        gradient_bytes=tensor_bytes(shapes, 4),
        optimizer_bytes=state_bytes(shapes),
        parameter_bytes_fsdp=tensor_bytes(shapes, 4, num_processes),
        gradient_bytes_fsdp=tensor_bytes(shapes, 4, num_processes),
        optimizer_bytes_fsdp=state_bytes(shapes, num_processes),
        buffer_bytes=buffer_bytes,
    )


def _adapter_shapes(model: torch.nn.Module, adapter_name: str) -> list[tuple[int, ...]]:
    marker = f".{adapter_name}."
    return [tuple(p.shape) for name, p in model.named_parameters() if "lora_" in name and marker in name]


def plan_from_components(
    components: dict[str, torch.nn.Module],
    family: ModelFamily,
    training_mode: str,
    training_dtype: torch.dtype,
    student_lora: dict,
    fake_lora: dict,
    use_8bit_adam: bool = False,
    num_processes: int = 1,
    text_encoders_on_device: bool = True,
    reward_vae: torch.nn.Module | None = None,
) -> MemoryPlan:
    """The plan for meta-device (or real) `components` keyed by pipeline name (`text_encoder`, `vae`, `unet`, ...).

    The backbone (`components[family.backbone_name]`) gets the `student` and `fake` LoRA adapters added in place
    (`student_lora` / `fake_lora`: `add_lora_adapter` keyword arguments), so pass meta models.
    """
    from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER, add_lora_adapter

    frozen = []
    for name in TEXT_ENCODER_NAMES:
        if name in components:
            frozen.append(
                _frozen_component(
                    name,
                    components[name],
                    training_dtype,
                    num_processes,
                    sharded=False,
                    on_device=text_encoders_on_device,
                )
            )
    if "vae" in components:
        vae = components["vae"]
        upcast = training_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        frozen.append(_frozen_component("vae", vae, torch.float32 if upcast else training_dtype, num_processes, False))
    if reward_vae is not None:
        frozen.append(_frozen_component("reward_vae", reward_vae, training_dtype, num_processes, sharded=False))

    backbone = components[family.backbone_name]
    base_parameter_shapes = [tuple(p.shape) for p in backbone.parameters()]
    # A full student owns fp32 copies of the backbone's buffers (integer buffers keep their dtype).
    base_buffer_bytes = sum(
        b.numel() * (4 if b.dtype.is_floating_point else b.dtype.itemsize) for b in backbone.buffers()
    )
    base_role = "frozen base of teacher + fake score" if training_mode == "full" else "shared base"
    frozen.append(
        _frozen_component(f"{family.backbone_name} ({base_role})", backbone, training_dtype, num_processes, True)
    )
    with torch.device("meta"):
        if training_mode != "full":
            add_lora_adapter(backbone, STUDENT_ADAPTER, **student_lora)
        add_lora_adapter(backbone, FAKE_ADAPTER, **fake_lora)
    if training_mode == "full":
        student = _trainable_network(
            "student", base_parameter_shapes, use_8bit_adam, num_processes, buffer_bytes=base_buffer_bytes
        )
    else:
        student = _trainable_network(
            "student", _adapter_shapes(backbone, STUDENT_ADAPTER), use_8bit_adam, num_processes
        )
    fake_shapes = _adapter_shapes(backbone, FAKE_ADAPTER)
    fake = _trainable_network("fake score", fake_shapes, use_8bit_adam, num_processes)
    trainable_shapes = base_parameter_shapes if training_mode == "full" else _adapter_shapes(backbone, STUDENT_ADAPTER)
    shared_bytes = adamw8bit_shared_bytes(trainable_shapes + fake_shapes) if use_8bit_adam else 0
    return MemoryPlan(
        family=family.name,
        training_mode=training_mode,
        training_dtype=str(training_dtype).removeprefix("torch."),
        optimizer="AdamW8bit" if use_8bit_adam else "AdamW",
        num_processes=num_processes,
        text_encoders="on the device" if text_encoders_on_device else "off the device (cached embeddings/offloaded)",
        frozen=frozen,
        networks=[student, fake],
        optimizer_shared_bytes=shared_bytes,
    )


def meta_components(
    source: str, model_index: dict, family: ModelFamily, revision: str | None = None
) -> dict[str, torch.nn.Module]:
    """The teacher's weighted components (text encoders, VAE, backbone) as meta-device models, from their
    `config.json` files alone; components `model_index.json` does not list (or lists as `null`) are skipped."""
    components = {}
    for name in (*TEXT_ENCODER_NAMES, "vae", family.backbone_name):
        entry = model_index.get(name)
        if not isinstance(entry, list | tuple) or len(entry) != 2 or entry[0] is None:
            continue
        library, class_name = entry
        config = read_component_config(source, name, revision)
        components[name] = meta_model(library, class_name, config)
    return components


def training_dtype_for(mixed_precision: str | None, environ: dict | None = None) -> torch.dtype:
    """The frozen weights' dtype: `--mixed_precision`, else accelerate's launch setting (`ACCELERATE_MIXED_PRECISION`,
    which `accelerate launch` exports from its config), else float32 -- the rule `Accelerator` itself applies."""
    import os

    environ = os.environ if environ is None else environ
    value = mixed_precision or environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed precision {value!r} is not one of ['bf16', 'fp16', 'no'] (--mixed_precision).")
    return resolve_dtype(value)


def memory_plan_for(config, family: ModelFamily, model_index: dict) -> MemoryPlan | None:
    """The plan of a `DMDRConfig` run, from the teacher's (and the reward autoencoder's) configs alone.

    Returns `None` only when `model_index.json` lists no backbone at all (nothing to plan); a listed component whose
    `config.json` is missing is an error, as loading it would be.
    """
    import os

    from .adapters import parse_target_modules

    source, revision = config.pretrained_model_name_or_path, config.revision
    components = meta_components(source, model_index, family, revision)
    if family.backbone_name not in components:
        return None
    reward_vae = None
    if config.reward_vae_model_name_or_path:
        reward_vae = meta_model("diffusers", "AutoencoderTiny", _root_config(config.reward_vae_model_name_or_path))
    num_processes = config.memory_plan_num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    student_targets = parse_target_modules(config.lora_target_modules, family.student_lora_targets)
    fake_targets = parse_target_modules(config.fake_lora_target_modules, family.fake_lora_targets)
    return plan_from_components(
        components,
        family,
        config.training_mode,
        training_dtype_for(config.mixed_precision),
        student_lora={"rank": config.lora_rank, "alpha": config.lora_alpha, "target_modules": student_targets},
        fake_lora={"rank": config.fake_lora_rank, "alpha": config.fake_lora_alpha, "target_modules": fake_targets},
        use_8bit_adam=config.use_8bit_adam,
        num_processes=num_processes,
        text_encoders_on_device=not (config.cache_prompt_embeds or config.offload_text_encoders),
        reward_vae=reward_vae,
    )


def _root_config(pretrained_model_name_or_path: str) -> dict:
    """`config.json` at the root of a model folder or Hub repo (the reward autoencoder's)."""
    import json
    from pathlib import Path

    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(pretrained_model_name_or_path, "config.json", **hub_cache_kwargs())
    except Exception as error:
        raise FileNotFoundError(
            f"--reward_vae_model_name_or_path {pretrained_model_name_or_path}: could not read its config.json "
            f"({type(error).__name__}: {error}); give a local AutoencoderTiny folder or check the Hub id."
        ) from error
    return json.loads(Path(file).read_text(encoding="utf-8"))
