"""Worker of tests/test_fsdp.py, started on 2 CPU processes (gloo) by

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/train_dmdr/accelerate_configs/fsdp2.yaml \
        --num_processes 2 --mixed_precision no tests/fsdp_worker.py TEACHER PROMPTS OUTPUT MODE [--with_ddp]

(or the two-node files, one process per "node"), so the shipped FSDP2 settings (wrap policy, state-dict type,
resharding, and the file's bf16 when `--mixed_precision` is not overridden) reach the processes exactly as a GPU launch
of that file passes them (the `FSDP_*` environment); tests/accelerate_fsdp.py switches accelerate onto its FSDP2 path,
which only accelerators take by themselves. MODE is `lora` or `full` (the student).

Runs, in one 2-process world (batch 1 per process, global batch 2):
- `ddp` (`--with_ddp`): data parallel, the unsharded reference, and an exact resume from its step-1 checkpoint;
- `fsdp2`: accelerate's FSDP2 `prepare`; a sharded checkpoint is written by `save_state` after step 1; the gathered
  student is exported by `export_from_trainer` (what train.py runs at the end); frozen-base and gradient facts;
- `fsdp2_resumed`: a new run resumed by `load_state` from that sharded checkpoint, for the second step.
Rank 0 writes `results.json` (losses, facts) and each run's gathered weights as safetensors.
"""

import json
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

PROMPTS = ["a red cat", "a blue dog", "the number seven", "a green house"]
# Per process: batch 1 (global batch 2). Large Adam epsilon: updates proportional to the gradients, so runs whose
# gradients agree to rounding agree in their weights too. A checkpoint after every step: the FSDP2 run's step-1
# checkpoint is the one the resumed run starts from.
COMMON = dict(
    max_train_steps=2,
    cold_start_steps=2,
    update_ratio=2,
    train_batch_size=1,
    adam_epsilon=1.0,
    learning_rate=0.5,
    learning_rate_fake=0.5,
    checkpointing_steps=1,
)


def weights_of(trainer, full_state=None) -> dict[str, dict[str, torch.Tensor]]:
    """The student's weights (as the export reads them) and the fake adapter's: copies of the full tensors, on the CPU
    (state dicts hold views of the live parameters)."""
    module_state = full_state if full_state is not None else trainer.training_module.state_dict()
    fake = {k: v.detach().float().cpu().clone() for k, v in module_state.items() if ".fake." in k}
    student = {k: v.detach().float().cpu().clone() for k, v in trainer.student_state_dict().items()}
    return {"student": student, "fake": fake}


def losses_of(history) -> list[list[float]]:
    return [[row["loss_dmd"], row["loss_fake"]] for row in history]


def main(teacher_dir: str, prompt_file: str, output: str, mode: str, *flags: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from accelerate_fsdp import check_fsdp2_switch, fsdp2_accelerator
    from conftest import tiny_config
    from safetensors.torch import save_file

    from diffusers_dmdr.export import export_from_trainer
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.sharding import gather_full_state_dict
    from diffusers_dmdr.trainer import DMDRTrainer, weight_dtype_of
    from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE

    output = Path(output)
    # The launch's --mixed_precision (the shipped file says bf16; the equality tests launch with `no`). The teacher
    # loads in the training dtype, as train.py loads it.
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    weight_dtype = weight_dtype_of(mixed_precision)
    common = {**COMMON, "training_mode": mode}
    # One module, two roles: each backward leaves the other role's parameters unused (as `create_accelerator` says).
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    results = {}

    def make_trainer(name, accelerator, **overrides):
        config = tiny_config(teacher_dir, prompt_file, output / name, **{**common, **overrides})
        teacher = get_family("sdxl").load_teacher(teacher_dir, dtype=weight_dtype)
        return DMDRTrainer(config, teacher, PROMPTS, accelerator=accelerator)

    def record(name, trainer, row, full_state=None):
        for network, tensors in weights_of(trainer, full_state).items():
            if trainer.accelerator.is_main_process:
                save_file(tensors, output / f"{name}_{network}.safetensors")
        results[name] = {
            "num_processes": trainer.accelerator.num_processes,
            "sharded": trainer.sharded,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "losses": losses_of(trainer.history),
            **row,
        }

    if "--with_ddp" in flags:
        # Before the switch: accelerate's state is process-wide, and the FSDP runs below keep it switched.
        trainer = make_trainer("ddp", Accelerator(cpu=True, kwargs_handlers=handlers))
        trainer.train()
        record("ddp", trainer, {})
        # Exact resume under DDP: a new run from the step-1 checkpoint for the second step.
        resumed = make_trainer(
            "ddp", Accelerator(cpu=True, kwargs_handlers=handlers), resume_from_checkpoint="checkpoint-1"
        )
        resumed.train()
        record("ddp_resumed", resumed, {"start_step": 1})

    # accelerate's own FSDP2 path with the launch's (the shipped file's) settings.
    accelerator = fsdp2_accelerator(kwargs_handlers=handlers)
    teacher = get_family("sdxl").load_teacher(teacher_dir, dtype=weight_dtype)
    base_before = {n: p.detach().clone() for n, p in teacher.backbone.named_parameters()}
    config = tiny_config(teacher_dir, prompt_file, output / "fsdp2", **common)
    trainer = DMDRTrainer(config, teacher, PROMPTS, accelerator=accelerator)
    row = {"switch": check_fsdp2_switch(accelerator, trainer.model)}
    trainer.train()
    full_state = gather_full_state_dict(accelerator, trainer.model)
    row["checkpoints"] = sorted(p.name for p in (output / "fsdp2").glob("checkpoint-*"))
    row["checkpoint_files"] = sorted(
        str(p.relative_to(output / "fsdp2" / "checkpoint-1")) for p in (output / "fsdp2" / "checkpoint-1").rglob("*")
    )
    if accelerator.is_main_process:
        # PEFT keeps a wrapped layer's frozen weight as `<layer>.base_layer.weight`.
        base_after = {
            k.removeprefix("backbone.").replace(".base_layer", ""): v
            for k, v in full_state.items()
            if k.startswith("backbone.") and "lora_" not in k
        }
        row["frozen_base_changed"] = [n for n, b in base_before.items() if not torch.equal(base_after[n], b)]
        row["frozen_base_compared"] = len(base_before)
    module = trainer.training_module
    # FSDP2 shards per parameter: a backward leaves the frozen base without gradients and gives the fake score
    # sharded gradients only.
    batch = trainer.rollout(0)[0]
    output_fake = trainer.guidance_denoiser(2.0).predict(
        batch.simulation.clean_sample, torch.tensor([0.5]), batch.condition
    )
    trainer._backward(output_fake.square().mean(), GUIDANCE_ROLE, 2.0, last=True)
    row["frozen_grads"] = sum(p.grad is not None for p in module.frozen_parameters())
    row["fake_grad_shapes_local_vs_full"] = [
        [list(p.grad.to_local().shape), list(p.shape)] for p in module.parameters_of(GUIDANCE_ROLE)[:4]
    ]
    row["dtypes"] = {
        name: sorted({str(p.dtype) for p in params})
        for name, params in (
            ("frozen", module.frozen_parameters()),
            ("student", module.parameters_of(STUDENT_ROLE)),
            ("fake", module.parameters_of(GUIDANCE_ROLE)),
        )
    }
    row["student_grads"] = sum(p.grad is not None for p in module.parameters_of(STUDENT_ROLE))
    trainer.optimizer.zero_grad(set_to_none=True)
    # The end of train.py: every process takes part in gathering the student; rank 0 writes the folder.
    export_dir = export_from_trainer(trainer)
    row["export_dir"] = None if export_dir is None else str(export_dir)
    record("fsdp2", trainer, row, full_state)

    # A new run resumed from the sharded step-1 checkpoint (accelerate's `load_state`), for the second step.
    checkpoint = output / "fsdp2" / "checkpoint-1"
    resumed = make_trainer(
        "fsdp2_resumed", fsdp2_accelerator(kwargs_handlers=handlers), resume_from_checkpoint=str(checkpoint)
    )
    resumed.train()
    record("fsdp2_resumed", resumed, {"start_step": 1}, gather_full_state_dict(resumed.accelerator, resumed.model))

    if trainer.accelerator.is_main_process:
        (output / "results.json").write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
