"""Worker of tests/test_fsdp.py, started by `torch.distributed.run --nproc_per_node 2`: the same DMDR run twice in one
2-process gloo world, once data parallel (DDP, the unsharded reference) and once sharded with FSDP2 by the policy of
the shipped FSDP2 config, then a sharded checkpoint round trip. Rank 0 writes what it saw as JSON."""

import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

PROMPTS = ["a red cat", "a blue dog", "the number seven", "a green house"]
# Per process: batch 1 (global batch 2). Large Adam epsilon: updates proportional to the gradients, so runs whose
# gradients agree to rounding agree in their weights too.
COMMON = dict(
    max_train_steps=2,
    cold_start_steps=2,
    update_ratio=2,
    train_batch_size=1,
    adam_epsilon=1.0,
    learning_rate=0.5,
    learning_rate_fake=0.5,
)


def summarise(history, student, fake) -> dict:
    return {
        "losses": [[r["loss_dmd"], r["loss_fake"]] for r in history],
        "student": {k: v.double().sum().item() for k, v in student.items()},
        "fake": {k: v.double().sum().item() for k, v in fake.items()},
    }


def main(teacher_dir: str, prompt_file: str, output: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from conftest import tiny_config
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.sharding import gather_full_state_dict, shard_training_module
    from diffusers_dmdr.trainer import DMDRTrainer
    from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE

    class FSDP2Accelerator(Accelerator):
        """accelerate takes its FSDP path on accelerators only: shard here, with the shipped config's policy."""

        def prepare(self, module, optimizer):
            shard_training_module(module)
            # fully_shard replaced the parameters: point the (still empty) optimizer groups at the sharded ones.
            for group in optimizer.param_groups:
                group["params"] = module.parameters_of(group["role"])
            return module, optimizer

    prompts, common = PROMPTS, COMMON
    results = {}
    # One module, two roles: each backward leaves the other role's parameters unused (as `create_accelerator` says).
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    for name, accelerator_class in (("ddp", Accelerator), ("fsdp2", FSDP2Accelerator)):
        out = Path(output) / name
        config = tiny_config(teacher_dir, prompt_file, out, **common)
        teacher = get_family("sdxl").load_teacher(teacher_dir)
        base_before = {n: p.detach().clone() for n, p in teacher.backbone.named_parameters()}
        trainer = DMDRTrainer(
            config, teacher, prompts, accelerator=accelerator_class(cpu=True, kwargs_handlers=handlers)
        )
        # accelerate's save_state has no FSDP path on CPU: the sharded round trip is checked below with torch DCP.
        trainer.save_checkpoint = lambda: None
        history = trainer.train()
        full_state = gather_full_state_dict(trainer.accelerator, trainer.model) if trainer.sharded else None
        student = trainer.student_state_dict()
        fake = {k: v for k, v in (full_state or trainer.training_module.state_dict()).items() if ".fake." in k}
        row = {
            "num_processes": trainer.accelerator.num_processes,
            "sharded": trainer.sharded,
            **summarise(history, student, fake),
        }
        if not trainer.sharded:
            # Exact resume under DDP: 1 step, a real checkpoint, then resume `latest` for the second step.
            resume_dir = Path(output) / "resume"
            for overrides in ({"max_train_steps": 1, "cold_start_steps": 1}, {"resume_from_checkpoint": "latest"}):
                config = tiny_config(teacher_dir, prompt_file, resume_dir, **{**common, **overrides})
                teacher = get_family("sdxl").load_teacher(teacher_dir)
                resumed = DMDRTrainer(
                    config, teacher, prompts, accelerator=accelerator_class(cpu=True, kwargs_handlers=handlers)
                )
                resumed.train()
            fake = {k: v for k, v in resumed.training_module.state_dict().items() if ".fake." in k}
            row["resumed"] = summarise(resumed.history, resumed.student_state_dict(), fake)
        if trainer.sharded:
            module = trainer.training_module
            # PEFT keeps a wrapped layer's frozen weight as `<layer>.base_layer.weight`.
            base_after = {
                k.removeprefix("backbone.").replace(".base_layer", ""): v
                for k, v in full_state.items()
                if k.startswith("backbone.") and "lora_" not in k
            }
            # The gathered full state lives on rank 0 only (cpu_offload).
            changed = [n for n, b in base_before.items() if base_after and not torch.equal(base_after[n], b)]
            row["frozen_base_changed"] = changed
            # FSDP2 shards per parameter: a backward leaves the frozen base without gradients and gives the LoRA
            # weights sharded gradients only.
            batch = trainer.rollout(0)[0]
            output_fake = trainer.guidance_denoiser(2.0).predict(
                batch.simulation.clean_sample, torch.tensor([0.5]), batch.condition
            )
            trainer._backward(output_fake.square().mean(), GUIDANCE_ROLE, 2.0, last=True)
            row["frozen_grads"] = sum(p.grad is not None for p in module.frozen_parameters())
            row["fake_grad_shapes_local_vs_full"] = [
                [list(p.grad.to_local().shape), list(p.shape)] for p in module.parameters_of(GUIDANCE_ROLE)[:4]
            ]
            row["student_grads"] = sum(p.grad is not None for p in module.parameters_of(STUDENT_ROLE))
            trainer.optimizer.zero_grad(set_to_none=True)
            # Sharded checkpoint round trip: save, perturb the trainable weights, load, compare.
            checkpoint = str(Path(output) / "dcp")
            saved = {k: v.full_tensor().clone() for k, v in get_model_state_dict(module).items()}
            dcp.save({"model": get_model_state_dict(module)}, checkpoint_id=checkpoint)
            with torch.no_grad():
                for role in (STUDENT_ROLE, GUIDANCE_ROLE):
                    for parameter in module.parameters_of(role):
                        parameter.add_(1.0)
            state = {"model": get_model_state_dict(module)}
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(module, state["model"])
            restored = {k: v.full_tensor() for k, v in get_model_state_dict(module).items()}
            row["checkpoint_round_trip_exact"] = all(torch.equal(restored[k], saved[k]) for k in saved)
        results[name] = row
    if dist.get_rank() == 0:
        Path(output, "results.json").write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:4])
