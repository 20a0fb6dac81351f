"""`--base_quantization`: the frozen base loaded quantized through diffusers' own backends (issue 23, QLoRA-style).

On this CPU machine the torchao int8 weight-only backend runs for real: tiny SDXL and SD3 teachers train with their
base's linear weights in int8 and the LoRA adapters in float32; the checkpoint resumes exactly; the exported LoRA
loads on the stock, unquantized pipeline. The bitsandbytes backends need CUDA: their refusals are tested here.
"""

import json
import math

import pytest
import torch
from conftest import tiny_config


pytest.importorskip("torchao", reason="torchao is the optional `quant` extra: pip install diffusers-dmdr[quant]")

from torchao.utils import TorchAOBaseTensor  # noqa: E402

from diffusers_dmdr.adapters import (  # noqa: E402
    FAKE_ADAPTER,
    STUDENT_ADAPTER,
    build_training_backbones,
    check_base_quantization_matches,
    keep_frozen_base_out_of_ddp_broadcast,
    load_training_teacher,
)
from diffusers_dmdr.families import get_family  # noqa: E402
from diffusers_dmdr.trainer import DMDRTrainer  # noqa: E402


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


def quantized_trainer(teacher_dir, prompt_file, output_dir, family="sdxl", **overrides) -> DMDRTrainer:
    config = tiny_config(teacher_dir, prompt_file, output_dir, base_quantization="torchao_int8", **overrides)
    teacher = load_training_teacher(get_family(family), config, torch.float32)
    return DMDRTrainer(config, teacher, PROMPTS)


def base_linear_layers(backbone) -> dict[str, torch.nn.Linear]:
    """The backbone's own `nn.Linear` layers (PEFT's `lora_A` / `lora_B` linears excluded)."""
    return {
        name: module
        for name, module in backbone.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name
    }


def lora_parameters(backbone, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in backbone.named_parameters() if "lora_" in name and f".{adapter}." in name}


def quantized_data(backbone) -> dict[str, torch.Tensor]:
    return {name: layer.weight.qdata.clone() for name, layer in base_linear_layers(backbone).items()}


def loaded_bytes(module: torch.nn.Module) -> int:
    """Bytes a loaded module holds: each parameter and buffer, a quantized weight by its component tensors."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        names = getattr(tensor, "tensor_data_names", None)
        parts = [getattr(tensor, name) for name in names] if names else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def student_prediction(trainer, sample, timestep, condition, role="student", lora_scale=1.0):
    return trainer.training_module(role, sample, timestep, condition, lora_scale=lora_scale)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_torchao_int8_base_trains_lora_adapters_in_float32(family, tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = quantized_trainer(tiny_teacher_dirs[family], prompt_file, tmp_path, family=family)
    backbone = trainer.training_module.backbone
    linears = base_linear_layers(backbone)
    assert linears and all(isinstance(layer.weight, TorchAOBaseTensor) for layer in linears.values())
    assert {layer.weight.qdata.dtype for layer in linears.values()} == {torch.int8}
    adapters = {adapter: lora_parameters(backbone, adapter) for adapter in (STUDENT_ADAPTER, FAKE_ADAPTER)}
    for parameters in adapters.values():
        assert parameters and all(p.dtype == torch.float32 and p.requires_grad for p in parameters.values())
    # The base is frozen and never handed to the optimizer.
    assert not any(p.requires_grad for name, p in backbone.named_parameters() if "lora_" not in name)
    before = {adapter: {n: p.detach().clone() for n, p in ps.items()} for adapter, ps in adapters.items()}
    base_before = quantized_data(backbone)

    history = trainer.train()

    assert len(history) == 2
    for row in history:
        assert math.isfinite(row["loss_dmd"]) and math.isfinite(row["loss_fake"]) and row["step_skipped"] == 0
    for adapter, parameters in adapters.items():
        changed = [n for n, p in parameters.items() if not torch.equal(p.detach(), before[adapter][n])]
        assert changed, f"the {adapter} adapter did not train"
    after = quantized_data(backbone)
    assert all(torch.equal(after[name], base_before[name]) for name in base_before)

    # One more backward through the student route: every student LoRA tensor gets a float32 gradient, the quantized
    # base none.
    trainer.optimizer.zero_grad(set_to_none=True)
    condition = trainer.encode(PROMPTS[:2])
    sample = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((2,), 500.0)
    student_prediction(trainer, sample, timestep, condition).float().pow(2).mean().backward()
    gradients = {n: p.grad for n, p in adapters[STUDENT_ADAPTER].items()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients.values())
    assert any(bool(g.abs().sum() > 0) for g in gradients.values())
    assert all(layer.weight.grad is None for layer in linears.values())


def test_the_quantized_teacher_is_close_to_the_stock_one_but_not_equal(tiny_teacher_dirs, prompt_file, tmp_path):
    """Multiplier 0 is the teacher: the int8 base, within int8 rounding of the float32 backbone (so the
    quantization is really applied, and it does not wreck the teacher)."""
    trainer = quantized_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path)
    stock = get_family("sdxl").load_backbone(tiny_teacher_dirs["sdxl"]).eval()
    condition = trainer.encode(PROMPTS[:2])
    sample = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    timestep = torch.full((2,), 700.0)
    with torch.no_grad():
        quantized = student_prediction(trainer, sample, timestep, condition, role="guidance", lora_scale=0.0)
        reference = get_family("sdxl").call_backbone(stock, sample, timestep, condition)
    relative = float((quantized - reference).norm() / reference.norm())
    assert 0 < relative < 0.05, relative


def test_quantized_run_resumes_exactly(tiny_teacher_dirs, prompt_file, tmp_path):
    common = dict(max_train_steps=3, cold_start_steps=2, dynamic_steps=2, checkpointing_steps=1)
    uninterrupted = quantized_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", **common)
    history_a = uninterrupted.train()
    first = quantized_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", **{**common, "max_train_steps": 2}
    )
    first.train()
    resumed = quantized_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", **common, resume_from_checkpoint="latest"
    )
    history_b = resumed.train()
    assert [row["step"] for row in history_b] == [3]
    assert history_a[2]["loss_dmd"] == history_b[0]["loss_dmd"]
    assert history_a[2]["loss_fake"] == history_b[0]["loss_fake"]
    for adapter in (STUDENT_ADAPTER, FAKE_ADAPTER):
        weights_a = lora_parameters(uninterrupted.training_module.backbone, adapter)
        weights_b = lora_parameters(resumed.training_module.backbone, adapter)
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a), adapter
    # Only the adapters are in the checkpoint, never the quantized base.
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint-2").glob("*.safetensors")) == [
        "fake_lora.safetensors",
        "student_lora.safetensors",
    ]


def test_export_of_a_quantized_run_loads_on_the_stock_pipeline(tiny_teacher_dirs, prompt_file, tmp_path):
    """The exported LoRA (float32 adapters) applies to the stock fp32 and bf16 pipelines; the fused full pipeline is
    the unquantized backbone with the student fused in; both are the trained student up to int8 rounding."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_dmdr.export import export_from_trainer
    from diffusers_dmdr.pipelines.pipeline_dmdr import FewStepDMDRPipeline

    teacher_dir = tiny_teacher_dirs["sdxl"]
    trainer = quantized_trainer(teacher_dir, prompt_file, tmp_path, export_full_pipeline=True)
    # LoRA B starts at zero: a visible student (~30% from the teacher), so that "the LoRA applies" cannot pass
    # trivially. A far larger change (std 0.5: 126%) drives the tiny U-Net where int8 rounding of the base is
    # amplified tenfold, which says nothing about the export.
    with torch.no_grad():
        for name, parameter in lora_parameters(trainer.training_module.backbone, STUDENT_ADAPTER).items():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    export_dir = export_from_trainer(trainer)

    condition = trainer.encode(PROMPTS[:2])
    sample = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(2))
    timestep = torch.full((2,), 600.0)
    call = get_family("sdxl").call_backbone
    with torch.no_grad():
        trained = student_prediction(trainer, sample, timestep, condition)
        stock = StableDiffusionXLPipeline.from_pretrained(teacher_dir)
        teacher = call(stock.unet, sample, timestep, condition)
        stock.load_lora_weights(str(export_dir))
        assert not any(isinstance(p, TorchAOBaseTensor) for p in stock.unet.parameters())
        with_lora = call(stock.unet, sample, timestep, condition)
        fused = FewStepDMDRPipeline.from_pretrained(str(export_dir))
        assert not any(isinstance(p, TorchAOBaseTensor) for p in fused.unet.parameters())
        from_folder = call(fused.unet, sample, timestep, condition)
        stock_bf16 = StableDiffusionXLPipeline.from_pretrained(teacher_dir, dtype=torch.bfloat16)
        stock_bf16.load_lora_weights(str(export_dir))
        bf16_condition = torch.utils._pytree.tree_map(
            lambda v: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v, condition
        )
        with_lora_bf16 = call(stock_bf16.unet, sample.to(torch.bfloat16), timestep, bf16_condition).float()

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert relative(with_lora, teacher) > 0.05  # the LoRA changes the stock model
    assert relative(with_lora, trained) < 0.02  # ... into the trained student, up to int8 rounding of the base
    torch.testing.assert_close(from_folder, with_lora, atol=1e-4, rtol=1e-4)
    assert relative(with_lora_bf16, with_lora) < 0.05


def test_ddp_skips_the_quantized_base_when_it_broadcasts(tiny_teacher_dirs, prompt_file, tmp_path):
    """DDP broadcasts rank 0's tensors when it wraps a model; torchao's int8 tensors cannot be broadcast, so the
    training module tells DDP to skip its frozen base. A one-process gloo group runs the real DDP constructor."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    module = quantized_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path).training_module
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    frozen = {f"backbone.{n}" for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert frozen and frozen <= ignored
    assert not any("lora_" in name for name in ignored)  # the adapters stay synchronised
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        DistributedDataParallel(module, find_unused_parameters=True)
        del module._ddp_params_and_buffers_to_ignore
        with pytest.raises(NotImplementedError, match="Int8Tensor"):
            # Without the hook DDP fails on the quantized weights: if this stops failing, torchao learnt to broadcast
            # and `keep_frozen_base_out_of_ddp_broadcast` may be dropped.
            DistributedDataParallel(module, find_unused_parameters=True)
        assert keep_frozen_base_out_of_ddp_broadcast(module, module.backbone, "backbone")
        DistributedDataParallel(module, find_unused_parameters=True)
    finally:
        dist.destroy_process_group()


def test_memory_plan_counts_the_quantized_base_as_loaded(tiny_teacher_dirs, prompt_file, tmp_path):
    """The plan's frozen base under torchao_int8 is the bytes the loaded int8 U-Net holds, to the byte."""
    from diffusers_dmdr.families import read_teacher_config
    from diffusers_dmdr.memory_plan import memory_plan_for

    teacher_dir = tiny_teacher_dirs["sdxl"]
    family = get_family("sdxl")
    model_index = read_teacher_config(teacher_dir)
    plans = {
        scheme: memory_plan_for(
            tiny_config(teacher_dir, prompt_file, tmp_path, base_quantization=scheme), family, model_index
        )
        for scheme in ("none", "torchao_int8")
    }
    bases = {scheme: next(c for c in plan.frozen if c.name.startswith("unet")) for scheme, plan in plans.items()}
    config = tiny_config(teacher_dir, prompt_file, tmp_path, base_quantization="torchao_int8")
    loaded = load_training_teacher(family, config, torch.float32).backbone
    assert bases["torchao_int8"].bytes == loaded_bytes(loaded)
    assert bases["none"].bytes == loaded_bytes(family.load_backbone(teacher_dir))
    assert bases["torchao_int8"].bytes < bases["none"].bytes
    assert bases["torchao_int8"].dtype == "int8 + float32"
    assert bases["torchao_int8"].bytes_per_process_fsdp == bases["torchao_int8"].bytes  # never sharded
    assert plans["torchao_int8"].total_bytes() < plans["none"].total_bytes()


# ------------------------------------------------------------------------------------------------------------------
# Refusals, before any weight loads
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, environment, message",
    [
        ({"base_quantization": "bnb_nf4"}, {}, "--base_quantization bnb_nf4 needs a CUDA GPU"),
        ({"base_quantization": "bnb_int8"}, {}, "--base_quantization bnb_int8 needs a CUDA GPU"),
        ({"base_quantization": "torchao_int8", "training_mode": "full"}, {}, "needs --training_mode lora"),
        ({"base_quantization": "torchao_int8"}, {"ACCELERATE_USE_FSDP": "true"}, "not supported under FSDP2"),
    ],
)
def test_preflight_refuses_what_a_quantized_base_cannot_do(
    overrides, environment, message, tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch
):
    from diffusers_dmdr.preflight import check_run_inputs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        check_run_inputs(tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, **overrides))


def test_preflight_names_the_extra_when_torchao_is_missing(tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch):
    from diffusers_dmdr import preflight

    monkeypatch.setattr(preflight, "_torchao_usable", lambda: False)
    with pytest.raises(ImportError, match=r"pip install diffusers-dmdr\[quant\]"):
        preflight.check_run_inputs(
            tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, base_quantization="torchao_int8")
        )


def test_train_command_refuses_bnb_on_the_cpu_in_one_line_before_loading(
    tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch, capsys
):
    from diffusers_dmdr import train
    from diffusers_dmdr.families import SDXLFamily

    def no_weight_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(SDXLFamily, "load_teacher", no_weight_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [
        f"--pretrained_model_name_or_path={tiny_teacher_dirs['sdxl']}",
        f"--train_prompts={prompt_file}",
        f"--output_dir={tmp_path}",
        "--resolution=64",
        "--report_to=none",
        "--base_quantization=bnb_nf4",
    ]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "torchao_int8" in lines[0]


def test_unknown_scheme_is_refused_by_the_config(tiny_teacher_dirs, prompt_file, tmp_path):
    with pytest.raises(ValueError, match="--base_quantization must be one of"):
        tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, base_quantization="fp8")


def test_a_quantized_base_is_refused_in_full_mode_and_a_mismatched_teacher_named(
    tiny_teacher_dirs, prompt_file, tmp_path
):
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, base_quantization="torchao_int8")
    family = get_family("sdxl")
    quantized = load_training_teacher(family, config, torch.float32).backbone
    lora = {"rank": 2, "alpha": 2, "target_modules": ["to_q"]}
    with pytest.raises(ValueError, match="trains LoRA students only"):
        build_training_backbones(quantized, "full", torch.float32, lora, lora)
    with pytest.raises(ValueError, match="set base_quantization none"):
        check_base_quantization_matches(family.load_backbone(tiny_teacher_dirs["sdxl"]), "torchao_int8")
    with pytest.raises(ValueError, match="--base_quantization is none"):
        check_base_quantization_matches(quantized, "none")
    check_base_quantization_matches(quantized, "torchao_int8")


def test_resuming_with_another_base_quantization_is_refused(tiny_teacher_dirs, prompt_file, tmp_path):
    from diffusers_dmdr.preflight import check_resume_recipe

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    recorded = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, base_quantization="torchao_int8")
    recorded.save_yaml(checkpoint / "dmdr_config.yaml")
    current = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path)
    with pytest.raises(ValueError, match="--base_quantization none differs from the checkpoint's --base_quantization"):
        check_resume_recipe(current, checkpoint, "sdxl", [999.0])
    assert json.loads(json.dumps(recorded.to_dict()))["base_quantization"] == "torchao_int8"


def test_importing_the_package_first_drops_torchao_import_notices():
    """With torchao installed, `import diffusers_dmdr` before diffusers / peft keeps their torchao import quiet (the
    notices of `quiet_imports.TORCHAO_NOTICES`); imported the other way round, the notices print (negative control:
    if torchao stops printing them, the filters may be dropped)."""
    import os
    import subprocess
    import sys

    libraries = "from diffusers import UNet2DConditionModel\nimport peft.tuners.lora\nimport torchao\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = {}
    for name, code in (("quiet", "import diffusers_dmdr\n" + libraries), ("control", libraries)):
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stderr
    markers = ("is an Enum subclass and is now natively supported", "Unable to import `torchao` Tensor objects")
    if torch.version.cuda is None:
        markers += ("Failed to load ",)
    for marker in markers:
        assert marker not in outputs["quiet"], outputs["quiet"]
        assert marker in outputs["control"], f"torchao no longer logs {marker!r}: see quiet_imports.TORCHAO_NOTICES"


@pytest.mark.slow
def test_train_command_with_an_int8_base_on_two_data_parallel_processes(tiny_teacher_dirs, prompt_file, tmp_path):
    """`accelerate launch train.py --base_quantization torchao_int8` on 2 gloo processes: the teacher loads int8
    through `load_training_teacher`, DDP wraps the module (the frozen base skipped in its broadcast), the replicas
    stay identical, and the export is a LoRA for the stock teacher."""
    from test_train_script import run_training, tiny_args

    output_dir = tmp_path / "run"
    args = tiny_args(tiny_teacher_dirs["sdxl"], prompt_file, output_dir, steps=2)
    run_training(args + ["--base_quantization", "torchao_int8", "--checkpointing_steps", "1"], processes=2)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2, "the launch fell back to a single process"
    assert summary["replicas_identical"], summary["replica_checksums"]
    assert all(math.isfinite(row["loss_dmd"]) for row in summary["history"])
    assert "base_quantization: torchao_int8" in (output_dir / "dmdr_config.yaml").read_text()
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("*.safetensors")) == [
        "fake_lora.safetensors",
        "student_lora.safetensors",
    ]
