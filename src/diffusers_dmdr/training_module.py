"""DMDRTrainingModule: the one `nn.Module` that trains, so every engine (DDP, FSDP2) wraps one model.

accelerate prepares one model per call under FSDP2, and torch's FSDP2 refuses a parameter seen by two sharded groups. So the student and the guidance network are not two modules sharing
tensors: they are two *routes* through one module that stores the frozen base once.

Routes (`forward(role, ...)`):
- `"student"`: LoRA mode: the base with the `student` adapter; full mode: the trainable float32 `student_backbone`.
- `"guidance"` at multiplier `lora_scale`: the base with the `fake` adapter at `lora_scale` times its own scale. The
  fake score is multiplier `lambda_f`, the real score the DynaDG multiplier, and multiplier 0 is the teacher exactly.

Every call goes through `forward`, so the engine's hooks (DDP's reducer, FSDP2's all-gathers) see every pass.
"""

import torch

from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER, AdapterRouter, build_training_backbones, parse_target_modules


STUDENT_ROLE = "student"
GUIDANCE_ROLE = "guidance"


class DMDRTrainingModule(torch.nn.Module):
    """The trainable part of a DMDR run: the frozen base with its adapters, and the full student when there is one.

    Args:
        backbone (`torch.nn.Module`): the teacher's backbone carrying the adapters (see
            [`~adapters.build_training_backbones`]).
        call_backbone (`Callable`): the family's `call_backbone(backbone, sample, timestep, condition)`.
        student_backbone (`torch.nn.Module`, *optional*): the full student (full mode only).
    """

    def __init__(self, backbone: torch.nn.Module, call_backbone, student_backbone: torch.nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.student_backbone = student_backbone
        self.call_backbone = call_backbone
        self.router = AdapterRouter(backbone)
        # accelerate's FSDP2 transformer wrap policy reads `_no_split_modules` from the root it is given: the backbone's
        # own blocks become the sharded units (one config for every family).
        self._no_split_modules = list(getattr(backbone, "_no_split_modules", None) or [])

    @property
    def is_full(self) -> bool:
        return self.student_backbone is not None

    def route(self, role: str, lora_scale: float = 1.0) -> None:
        """Set the adapters for `role`. Routing stays set after a forward pass on purpose: gradient checkpointing
        recomputes the forward during backward, so the trainer routes to the updated role again before `backward`."""
        if role == STUDENT_ROLE:
            # A full student has no adapter; the base's adapters are irrelevant to it.
            if not self.is_full:
                self.router.route(STUDENT_ADAPTER, 1.0)
        elif role == GUIDANCE_ROLE:
            self.router.route(FAKE_ADAPTER, lora_scale)
        else:
            raise ValueError(f"Unknown role {role!r}; use {STUDENT_ROLE!r} or {GUIDANCE_ROLE!r}.")

    def forward(
        self, role: str, sample: torch.Tensor, timestep: torch.Tensor, condition: dict, lora_scale: float = 1.0
    ) -> torch.Tensor:
        """The backbone's raw prediction (eps, v or flow velocity) for `role`."""
        self.route(role, lora_scale)
        backbone = self.student_backbone if role == STUDENT_ROLE and self.is_full else self.backbone
        return self.call_backbone(backbone, sample, timestep, condition)

    def parameters_of(self, role: str) -> list[torch.nn.Parameter]:
        """The trainable parameters of `role`: its optimizer parameter group."""
        if role == STUDENT_ROLE and self.is_full:
            return [p for p in self.student_backbone.parameters() if p.requires_grad]
        adapter = STUDENT_ADAPTER if role == STUDENT_ROLE else FAKE_ADAPTER
        return [p for name, p in self.backbone.named_parameters() if p.requires_grad and f".{adapter}." in name]

    def frozen_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.parameters() if not p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        self.backbone.enable_gradient_checkpointing()
        if self.is_full:
            self.student_backbone.enable_gradient_checkpointing()


def build_training_module(teacher, config, weight_dtype: torch.dtype) -> DMDRTrainingModule:
    """The training module of a run: the teacher's backbone as the frozen base in `weight_dtype` with the `fake`
    adapter, and the student as a `student` adapter (LoRA mode) or a float32 copy (full mode), per `config`."""
    family = teacher.family
    student_targets = parse_target_modules(config.lora_target_modules, family.student_lora_targets)
    fake_targets = parse_target_modules(config.fake_lora_target_modules, family.fake_lora_targets)
    student_backbone = None
    if config.training_mode == "full" and teacher.backbone.dtype != torch.float32:
        # The trainable copy is read in float32 from the checkpoint, not upcast from the low-precision base.
        student_backbone = family.load_backbone(teacher.source, config.revision, config.variant, torch.float32)
    backbone, student_backbone = build_training_backbones(
        teacher.backbone,
        config.training_mode,
        weight_dtype,
        student_lora={
            "rank": config.lora_rank,
            "alpha": config.lora_alpha,
            "target_modules": student_targets,
            "dropout": config.lora_dropout,
        },
        fake_lora={"rank": config.fake_lora_rank, "alpha": config.fake_lora_alpha, "target_modules": fake_targets},
        seed=config.seed,
        student_backbone=student_backbone,
        init=config.init_lora_weights,
        student_init_path=config.student_init_path,
    )
    module = DMDRTrainingModule(backbone, family.call_backbone, student_backbone)
    if config.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    return module
