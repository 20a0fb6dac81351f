#!/usr/bin/env python
"""Training-memory benchmark of one DMDR generator update with its fake-score updates (issue 8).

One measured iteration is what the trainer runs per generator step: `update_ratio` times (backward simulation of
the student without grad, one fake-score update), then one generator update (student forward with grad, real score
with CFG and fake score without grad, DMD loss, optionally a differentiable reward decode). The losses are the
trainer's own objective (`method.objective.DMDRObjective`, through the same `Routes`), stepped per role on one
optimizer as the trainer steps it (`optimization.make_optimizer`, `step_role`), on random-init real architectures
(`adapters.build_training_backbones`, `DMDRTrainingModule`), and it compares

- `shared`: the project's layout, one frozen base under the student and fake LoRA adapters;
- `naive`: separate teacher, fake-score and student copies of the backbone (deep copies) in the same run;

with gradient checkpointing on/off, 8-bit AdamW, and a tiny (TAESD-shaped) vs full (AutoencoderKL) reward decode.
Text encoders are not run: conditioning tensors are random, of the real shapes. The reward is a differentiable
image statistic (hinge 0.7, from the first generator step on), so the decode is measured but no reward tower is.

Each configuration runs in its own process: on CUDA the peak is `torch.cuda.max_memory_allocated`; on the CPU it is
the peak RSS (`resource.getrusage`) above the process's RSS when it started (forked after the imports).

    python benchmarks/train_memory.py --tiny                       # one tiny iteration (what `make test` runs)
    python benchmarks/train_memory.py --model sdxl --device cuda   # the GPU measurement, 1024 px, bf16
    python benchmarks/train_memory.py --model sdxl-cpu             # the reduced CPU measurement in docs/benchmarks.md
    python benchmarks/train_memory.py --plan                       # memory plans of the real SDXL / SD3.5-L configs
"""

import argparse
import copy
import json
import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_dmdr.memory_estimate import SD35_LARGE, SDXL_UNET, SDXL_VAE


# ----------------------------------------------------------------------------------------------------------------
# Architectures (published configs; /work/shared/reference/gpu-floors.md) and reduced CPU variants
# ----------------------------------------------------------------------------------------------------------------
# SDXL_UNET, SDXL_VAE and SD3.5-Large's transformer: the published shapes the iteration estimator also builds (one
# copy, in the library).
SD35_VAE = dict(
    SDXL_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)  # fmt: skip
# TAESD-shaped tiny autoencoders (taesdxl: 4 latent channels; taesd3: 16).
TAESD = dict(
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
)
# Text encoders of the real pipelines (for the memory plan): CLIP ViT-L/14, OpenCLIP bigG/14, T5 v1.1 XXL.
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    hidden_act="gelu",
)  # fmt: skip
T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
    is_encoder_decoder=False, use_cache=False,
)  # fmt: skip


@dataclass
class ModelSpec:
    """What one benchmark model is: the family, the backbone config, the autoencoders, the latent and text sizes."""

    name: str
    family: str
    backbone: dict
    vae: dict
    taesd: dict
    resolution: int
    text_tokens: int
    description: str


def _reduced_sdxl() -> dict:
    # Half the width and a 2-block-deep bottleneck: ~0.2 B parameters, three fp32 copies fit a 24 GiB host.
    return dict(SDXL_UNET, block_out_channels=[160, 320, 640], transformer_layers_per_block=[1, 2, 2])


MODELS = {
    "sdxl": ModelSpec("sdxl", "sdxl", SDXL_UNET, SDXL_VAE, dict(TAESD, latent_channels=4), 1024, 77, "SDXL UNet"),
    "sd35-large": ModelSpec(
        "sd35-large", "sd3", SD35_LARGE, SD35_VAE, dict(TAESD, latent_channels=16), 1024, 333,
        "SD3.5-Large transformer",
    ),
    "sdxl-cpu": ModelSpec(
        "sdxl-cpu", "sdxl", _reduced_sdxl(), SDXL_VAE, dict(TAESD, latent_channels=4), 256, 77,
        "SDXL UNet at half width (block_out_channels 160/320/640), transformer depth 1/2/2 (SDXL: 1/2/10)",
    ),
    "sd35-cpu": ModelSpec(
        "sd35-cpu", "sd3", dict(SD35_LARGE, num_layers=2, num_attention_heads=12, caption_projection_dim=768),
        SD35_VAE, dict(TAESD, latent_channels=16), 256, 77,
        "SD3.5-Large transformer with 2 of 38 layers and 12 of 38 heads (width 768)",
    ),
}  # fmt: skip


def tiny_spec() -> ModelSpec:
    from diffusers_dmdr import testing

    unet = dict(testing.tiny_sdxl_unet().config)
    vae = dict(testing.tiny_vae().config, scaling_factor=0.13025)
    taesd = dict(testing.tiny_autoencoder_tiny().config)
    return ModelSpec("tiny", "sdxl", unet, vae, taesd, 64, 16, "the tiny SDXL UNet of diffusers_dmdr.testing")


# ----------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured configuration."""

    name: str
    layout: str  # shared | naive
    gradient_checkpointing: bool
    use_8bit_adam: bool
    reward_decode: str  # none | tiny | full


ROWS = [
    Row("shared", "shared", False, False, "none"),
    Row("naive", "naive", False, False, "none"),
    Row("shared + ckpt", "shared", True, False, "none"),
    Row("naive + ckpt", "naive", True, False, "none"),
    Row("shared + ckpt + 8-bit Adam", "shared", True, True, "none"),
    Row("shared + ckpt + 8-bit + tiny decode", "shared", True, True, "tiny"),
    Row("shared + ckpt + 8-bit + full decode", "shared", True, True, "full"),
]
COMPARISONS = [("shared", "naive"), ("shared + ckpt", "naive + ckpt")]


# ----------------------------------------------------------------------------------------------------------------
# Building the run
# ----------------------------------------------------------------------------------------------------------------
def random_module(module_class, config: dict, device: torch.device, dtype: torch.dtype):
    """A real architecture with random weights, built on the meta device and materialised on `device` (initialising
    billions of parameters with the modules' own initialisers takes minutes on a CPU)."""
    with torch.device("meta"):
        module = module_class.from_config(config)
    module = module.to_empty(device=device)
    if dtype != torch.float32:
        module.to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02, generator=generator)
    return module.requires_grad_(False).eval()


def conditions(spec: ModelSpec, batch_size: int, device, dtype, generator) -> dict:
    """Random conditioning of the backbone's real shapes (text encoders are not part of this benchmark)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    config = spec.backbone
    if spec.family == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {
            "encoder_hidden_states": randn(batch_size, spec.text_tokens, config["cross_attention_dim"]),
            "added_cond_kwargs": {"text_embeds": randn(batch_size, pooled), "time_ids": randn(batch_size, 6)},
        }
    return {
        "encoder_hidden_states": randn(batch_size, spec.text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(batch_size, config["pooled_projection_dim"]),
    }


class Run:
    """Everything one iteration needs, built for one `Row`.

    `shared` is the trainer's layout: `adapters.build_training_backbones` + `DMDRTrainingModule` (one frozen base with
    the `student` and `fake` adapters, routed per role) and one optimizer with a group per role. `naive` keeps three
    independent backbones (deep copies): a teacher, a fake score with the `fake` adapter, a student with the `student`
    adapter, each wrapped in its own `DMDRTrainingModule` so the same routing and the same optimizer apply.
    """

    def __init__(self, spec: ModelSpec, row: Row, device: torch.device, args):
        from functools import partial

        from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel, UNet2DConditionModel

        from diffusers_dmdr import DMDRConfig
        from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER, add_lora_adapter, build_training_backbones
        from diffusers_dmdr.families import get_family
        from diffusers_dmdr.method.denoisers import Denoiser
        from diffusers_dmdr.method.objective import DMDRObjective, Routes
        from diffusers_dmdr.optimization import make_optimizer
        from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler
        from diffusers_dmdr.rewards import LoadedReward
        from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE, DMDRTrainingModule

        self.spec, self.row, self.device, self.args = spec, row, device, args
        self.family = get_family(spec.family)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        backbone_class = UNet2DConditionModel if spec.family == "sdxl" else SD3Transformer2DModel
        base = random_module(backbone_class, spec.backbone, device, self.dtype)
        student_lora = {"rank": args.lora_rank, "alpha": args.lora_rank, "target_modules": args.targets}
        fake_lora = {"rank": args.fake_lora_rank, "alpha": args.fake_lora_rank, "target_modules": args.targets}
        call = self.family.call_backbone
        if row.layout == "shared":
            backbone, _ = build_training_backbones(base, "lora", self.dtype, student_lora, fake_lora, seed=0)
            module = DMDRTrainingModule(backbone, call)
            self.student_module = self.fake_module = self.real_module = module
        else:
            student_base, fake_base = copy.deepcopy(base), copy.deepcopy(base)
            for backbone, adapter, lora in (
                (student_base, STUDENT_ADAPTER, student_lora),
                (fake_base, FAKE_ADAPTER, fake_lora),
            ):
                add_lora_adapter(backbone, adapter, **lora)
                for name, parameter in backbone.named_parameters():
                    if "lora_" in name:
                        parameter.requires_grad_(True)
                        parameter.data = parameter.data.float()
            self.student_module = DMDRTrainingModule(student_base, call)
            self.fake_module = DMDRTrainingModule(fake_base, call)
            self.real_module = DMDRTrainingModule(base, call)  # the teacher: no adapter at all
        self.modules = list({id(m): m for m in (self.student_module, self.fake_module, self.real_module)}.values())
        if row.gradient_checkpointing:
            self.student_module.backbone.enable_gradient_checkpointing()
            self.fake_module.backbone.enable_gradient_checkpointing()
        self.reward_vae = None
        if row.reward_decode == "tiny":
            self.reward_vae = random_module(AutoencoderTiny, spec.taesd, device, self.dtype)
        elif row.reward_decode == "full":
            self.reward_vae = random_module(AutoencoderKL, spec.vae, device, self.dtype)
        self.groups = {
            STUDENT_ROLE: self.student_module.parameters_of(STUDENT_ROLE),
            GUIDANCE_ROLE: self.fake_module.parameters_of(GUIDANCE_ROLE),
        }
        self.learning_rates = {role: 1e-6 for role in self.groups}
        self.optimizer = make_optimizer(
            self.groups,
            self.learning_rates,
            {role: 0.0 for role in self.groups},
            betas=(0.9, 0.999),
            eps=1e-8,
            use_8bit_adam=row.use_8bit_adam,
        )
        timesteps = self.family.default_student_timesteps(4, 5.0 if spec.family == "sd3" else None)
        self.scheduler = DMDRScheduler(
            prediction_type="flow" if self.family.is_flow else "epsilon",
            training_timesteps=timesteps,
            grid_shift=5.0 if self.family.is_flow else None,
            deterministic=self.family.default_backward_simulation == "ode",
        )
        channels = spec.backbone["in_channels"]
        self.latent_shape = (args.batch_size, channels, spec.resolution // 8, spec.resolution // 8)
        # The trainer's defaults (fake multiplier 2, CFG 7, DynaRS / DynaDG at their first step), rewards from step 0.
        config = DMDRConfig(
            pretrained_model_name_or_path=spec.name,
            train_prompts="benchmark",
            update_ratio=args.update_ratio,
            cold_start_steps=0,
            dynamic_steps=1,
            guidance_scale_jitter=0.0,
        )
        generator = torch.Generator(device).manual_seed(0)

        def guidance(lora_scale: float) -> Denoiser:
            if row.layout == "naive" and lora_scale != config.fake_score_lora_scale:
                # The naive layout's real score is its teacher copy (no adapter, so no DynaDG multiplier).
                return Denoiser(partial(self.real_module, GUIDANCE_ROLE, lora_scale=0.0), self.scheduler)
            return Denoiser(partial(self.fake_module, GUIDANCE_ROLE, lora_scale=lora_scale), self.scheduler)

        def brightness(images, prompts):
            return images.mean(dim=(1, 2, 3))

        self.objective = DMDRObjective(
            config,
            Routes(
                student=Denoiser(partial(self.student_module, STUDENT_ROLE), self.scheduler),
                guidance=guidance,
                student_parameters=lambda: self.groups[STUDENT_ROLE],
                real_score_x0=self.family.real_score_x0,
                encode=lambda prompts: conditions(spec, len(prompts), device, self.dtype, generator),
                uncondition=conditions(spec, 1, device, self.dtype, generator),
                initial_noise=lambda size, generators: randn_tensor(
                    (size, *self.latent_shape[1:]), generator=generators, device=device
                ),
                decode=lambda latents: self.family.decode(self.reward_vae, latents),
                rewards=[] if self.reward_vae is None else [LoadedReward("brightness", brightness, 1.0, 0.7)],
                eval_rewards=[],
                autocast=self.autocast,
            ),
        )

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.dtype)
        return torch.autocast("cpu", enabled=False)

    def tensor_bytes(self) -> int:
        """Bytes of every distinct weight, buffer, gradient and optimizer state now allocated."""
        seen = {}
        models = self.modules + ([self.reward_vae] if self.reward_vae else [])
        tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
        tensors += [p.grad for m in models for p in m.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        for tensor in tensors:
            seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))] = tensor
        return sum(t.numel() * t.element_size() for t in seen.values())

    def _update(self, role: str, batches: list, loss_fn) -> torch.Tensor:
        """One optimizer step of `role`, as the trainer's: the objective's loss, backward through the role's route
        (checkpointing recomputes the forward with the adapters routed as they are now), clip, `step_role`."""
        from diffusers_dmdr.optimization import step_role
        from diffusers_dmdr.training_module import STUDENT_ROLE

        module = self.student_module if role == STUDENT_ROLE else self.fake_module
        self.objective.before_update(role, 0)
        (batch,) = batches
        module.train()
        loss, _ = loss_fn(batch, 0)
        module.route(role, self.objective.lora_scale_of(role))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.groups[role], self.objective.config.max_grad_norm)
        step_role(self.optimizer, role, self.learning_rates)
        return loss

    def iteration(self, seed: int) -> None:
        """`update_ratio` x (backward simulation + fake-score update), then one generator update, as the trainer."""
        from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE

        prompts = ["a benchmark prompt"] * self.latent_shape[0]
        for index in range(self.args.update_ratio):
            batches = self.objective.rollout(seed * self.args.update_ratio + index, 0, prompts, 0, 1)
            self._update(GUIDANCE_ROLE, batches, self.objective.fake_score_loss)
        loss = self._update(STUDENT_ROLE, batches, self.objective.generator_loss)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.row.name}: the generator loss is {loss.item()}")


def measure(spec: ModelSpec, row: Row, device_name: str, args) -> dict:
    """Build `row` and run `warmup` + 1 iterations in this process; peak memory and the last iteration's seconds."""
    torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = Run(spec, row, device, args)
    for index in range(args.warmup):
        run.iteration(seed=index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    run.iteration(seed=args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    return {
        **asdict(row),
        "seconds": time.perf_counter() - begin,
        "peak_bytes": peak,
        "tensor_bytes": run.tensor_bytes(),
        "trainable_parameters": sum(p.numel() for group in run.groups.values() for p in group),
    }


def _child(queue, spec, row, device_name, args):
    try:
        queue.put(measure(spec, row, device_name, args))
    except BaseException as error:  # reported to the parent, which raises
        queue.put({"error": f"{type(error).__name__}: {error}"})


def preload_modules(use_8bit_adam: bool) -> None:
    """Import what the measured processes use once in the parent, so that forked children do not each pay the
    imports (seconds per child) inside the timed and measured region."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401
    from peft.tuners.lora import LoraModel  # noqa: F401

    from diffusers_dmdr import adapters, optimization, training_module  # noqa: F401
    from diffusers_dmdr.method import objective  # noqa: F401

    if use_8bit_adam:
        import bitsandbytes  # noqa: F401


def measure_in_subprocess(spec: ModelSpec, row: Row, device_name: str, args) -> dict:
    """Each configuration in its own process, so one's allocator state never shows in another's peak. The CPU run
    forks after the imports (no re-import cost; the child's peak RSS starts from the fork); CUDA spawns."""
    context = multiprocessing.get_context("spawn" if device_name.startswith("cuda") else "fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, spec, row, device_name, args))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{row.name}: {result['error']}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------
def format_results(results: list[dict], peak_label: str) -> str:
    gib = 1024**3
    lines = [
        f"| configuration | {peak_label} (GiB) | weights + optimizer states (GiB) | seconds / iteration |",
        "|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result['name']} | {result['peak_bytes'] / gib:.3f} | {result['tensor_bytes'] / gib:.3f} | "
            f"{result['seconds']:.2f} |"
        )
    by_name = {result["name"]: result for result in results}
    for shared, naive in COMPARISONS:
        if shared in by_name and naive in by_name:
            ratio_peak = by_name[shared]["peak_bytes"] / by_name[naive]["peak_bytes"]
            ratio_tensors = by_name[shared]["tensor_bytes"] / by_name[naive]["tensor_bytes"]
            lines.append(f"| ratio {shared} / {naive} | {ratio_peak:.3f} | {ratio_tensors:.3f} | |")
    return "\n".join(lines)


def real_model_plans() -> str:
    """Memory plans of the published SDXL and SD3.5-Large configs (meta device, exact counts) for the recipes."""
    import transformers
    from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel, UNet2DConditionModel

    from diffusers_dmdr.adapters import parse_target_modules
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.memory_plan import plan_from_components

    def meta(module_class, config):
        with torch.device("meta"):
            return module_class.from_config(config)

    def meta_text(model_class, config_class, values):
        with torch.device("meta"):
            return model_class(config_class(**values))

    def sdxl_components():
        return {
            "text_encoder": meta_text(transformers.CLIPTextModel, transformers.CLIPTextConfig, CLIP_L),
            "text_encoder_2": meta_text(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, CLIP_G),
            "vae": meta(AutoencoderKL, dict(SDXL_VAE, force_upcast=True)),
            "unet": meta(UNet2DConditionModel, SDXL_UNET),
        }

    def sd35_components():
        return {
            "text_encoder": meta_text(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, CLIP_L),
            "text_encoder_2": meta_text(transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, CLIP_G),
            "text_encoder_3": meta_text(transformers.T5EncoderModel, transformers.T5Config, T5_XXL),
            "vae": meta(AutoencoderKL, SD35_VAE),
            "transformer": meta(SD3Transformer2DModel, SD35_LARGE),
        }

    cases = [
        # (title, family, components, mode, dtype, student rank/alpha, fake rank, 8-bit, N, encoders on device, taesd)
        ("SDXL 4-step LoRA recipe (sdxl_4step.yaml), fp16, 8-bit AdamW, tiny reward decode",
         "sdxl", sdxl_components, "lora", torch.float16, (64, 64), 32, True, 1, True, dict(TAESD, latent_channels=4)),
        ("SDXL 1-step full recipe (sdxl_1step.yaml), fp16, 8-bit AdamW, FSDP2 over 8 processes",
         "sdxl", sdxl_components, "full", torch.float16, (64, 64), 32, True, 8, True, None),
        ("SD3.5-Large 4-step LoRA recipe (sd35_large_4step.yaml), bf16, 8-bit AdamW, prompt embeddings cached",
         "sd3", sd35_components, "lora", torch.bfloat16, (64, 128), 32, True, 1, False, dict(TAESD, latent_channels=16)),
        ("SD3.5-Large, same, text encoders on the device, AdamW, FSDP2 over 8 processes",
         "sd3", sd35_components, "lora", torch.bfloat16, (64, 128), 32, False, 8, True, None),
    ]  # fmt: skip
    sections = []
    for title, name, build, mode, dtype, (rank, alpha), fake_rank, use_8bit, processes, on_device, taesd in cases:
        family = get_family(name)
        targets = parse_target_modules(None, family.student_lora_targets)
        plan = plan_from_components(
            build(),
            family,
            mode,
            dtype,
            student_lora={"rank": rank, "alpha": alpha, "target_modules": targets},
            fake_lora={"rank": fake_rank, "alpha": fake_rank, "target_modules": targets},
            use_8bit_adam=use_8bit,
            num_processes=processes,
            text_encoders_on_device=on_device,
            reward_vae=None if taesd is None else meta(AutoencoderTiny, taesd),
        )
        sections.append(f"#### {title}\n\n```\n{plan.format_table()}\n```")
    return "\n\n".join(sections)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="one iteration of the tiny SDXL UNet (the test's run)")
    parser.add_argument("--model", choices=sorted(MODELS), default="sdxl-cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", default=None, help="configuration names to run (default: all)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--update_ratio", type=int, default=5, help="fake-score updates per generator update")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured iterations before the timed one")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--fake_lora_rank", type=int, default=32)
    parser.add_argument("--lora_targets", default="to_q,to_k,to_v,to_out.0")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per measured process")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--plan", action="store_true", help="print the memory plans of the real configs and exit")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.plan:
        print(real_model_plans())  # noqa: T201
        return []
    args.targets = [name for name in args.lora_targets.split(",") if name]
    spec = tiny_spec() if args.tiny else MODELS[args.model]
    if args.tiny:
        args.lora_rank, args.fake_lora_rank = 4, 4
    rows = [row for row in ROWS if args.rows is None or row.name in args.rows]
    peak_label = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS above start"
    preload_modules(any(row.use_8bit_adam for row in rows))
    results = []
    for row in rows:
        result = measure_in_subprocess(spec, row, args.device, args)
        results.append(result)
        print(f"{row.name}: peak {result['peak_bytes'] / 1024**3:.3f} GiB, {result['seconds']:.2f} s", flush=True)  # noqa: T201
    header = (
        f"{spec.description}: {spec.resolution} px, batch {args.batch_size}, update_ratio {args.update_ratio}, "
        f"student LoRA r{args.lora_rank}, fake LoRA r{args.fake_lora_rank} on {','.join(args.targets)}; "
        f"device {args.device}, torch {torch.__version__}"
    )
    print(header + "\n\n" + format_results(results, peak_label))  # noqa: T201
    if args.output:
        Path(args.output).write_text(json.dumps({"header": header, "results": results}, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
