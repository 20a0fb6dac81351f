"""The memory plan's bytes equal the bytes of the real modules' tensors (issue 8).

The plan is computed from the saved tiny teachers' configs on the meta device; the check builds the real training
module as the trainer does (`adapters.build_training_backbones`, `DMDRTrainingModule`, the one optimizer of
`optimization.make_optimizer` with a group per role), casts the frozen parts, runs one real backward and optimizer step
per role, and sums `numel * element_size` over the distinct tensors.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr.adapters import build_training_backbones, parse_target_modules
from diffusers_dmdr.families import get_family
from diffusers_dmdr.memory_plan import (
    GIB,
    adamw8bit_state_bytes,
    memory_plan_for,
    shard_numel,
    training_dtype_for,
)
from diffusers_dmdr.optimization import make_optimizer
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE, DMDRTrainingModule


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
TRAINING_DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def loaded_teachers(tiny_teacher_dirs):
    """The saved tiny teachers, loaded once per module (each test deep-copies what it mutates)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    classes = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
    return {family: classes[family].from_pretrained(tiny_teacher_dirs[family]) for family in classes}


def _distinct(tensors):
    """Tensors deduplicated by storage (the student and guidance network share their frozen base tensors)."""
    seen = {}
    for tensor in tensors:
        seen.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), tensor)
    return list(seen.values())


def _nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in _distinct(tensors))


def _state_bytes(optimizer, parameters, with_shared: bool) -> int:
    """Optimizer-state bytes of `parameters`; `with_shared=False` leaves out AdamW8bit's shared quantisation maps."""
    return _nbytes(
        value
        for parameter in parameters
        for key, value in optimizer.state[parameter].items()
        if torch.is_tensor(value) and (with_shared or not key.startswith("qmap"))
    )


def _backward(module, role, scale, condition):
    """One real forward/backward of `role` on random latents (bf16 autocast, as under mixed precision)."""
    backbone = module.student_backbone if role == STUDENT_ROLE and module.is_full else module.backbone
    sample = torch.randn(1, backbone.config.in_channels, 8, 8)
    timestep = torch.tensor([500.0])
    with torch.autocast("cpu", dtype=TRAINING_DTYPE):
        output = module(role, sample, timestep, condition, lora_scale=scale)
    output.float().square().mean().backward()


@pytest.mark.parametrize(
    ("family_name", "training_mode", "use_8bit_adam"),
    [
        ("sdxl", "lora", False),
        ("sdxl", "full", False),
        ("sd3", "lora", False),
        pytest.param(
            "sdxl", "lora", True, marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
        ),
        pytest.param(
            "sd3", "full", True, marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
        ),
    ],
)
def test_plan_bytes_equal_the_real_modules(
    family_name, training_mode, use_8bit_adam, tiny_teacher_dirs, loaded_teachers, prompt_file, tmp_path
):
    from diffusers_dmdr.testing import tiny_autoencoder_tiny

    teacher_dir = tiny_teacher_dirs[family_name]
    reward_vae = tiny_autoencoder_tiny()
    reward_vae.save_pretrained(tmp_path / "taesd")
    config = tiny_config(
        teacher_dir,
        prompt_file,
        tmp_path,
        training_mode=training_mode,
        use_8bit_adam=use_8bit_adam,
        mixed_precision="bf16",
        lora_rank=8,
        lora_alpha=8,
        fake_lora_rank=4,
        fake_lora_alpha=4,
        reward_vae_model_name_or_path=str(tmp_path / "taesd"),
    )
    family = get_family(family_name)
    model_index = json.loads((Path(teacher_dir) / "model_index.json").read_text())
    plan = memory_plan_for(config, family, model_index)

    # The real run: frozen parts cast as the trainer casts them, the networks built by the project's own builder.
    pipeline = copy.deepcopy(loaded_teachers[family_name])
    encoders = family.text_encoders(pipeline)
    for module in [*encoders, pipeline.vae, reward_vae]:
        module.requires_grad_(False).to(TRAINING_DTYPE)
    backbone, student_backbone = build_training_backbones(
        getattr(pipeline, family.backbone_name),
        training_mode,
        TRAINING_DTYPE,
        student_lora={
            "rank": 8,
            "alpha": 8,
            "target_modules": parse_target_modules(None, family.student_lora_targets),
        },
        fake_lora={"rank": 4, "alpha": 4, "target_modules": parse_target_modules(None, family.fake_lora_targets)},
    )
    module = DMDRTrainingModule(backbone, family.call_backbone, student_backbone)
    modules = [*encoders, pipeline.vae, reward_vae, module]
    every_tensor = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    frozen_real = _nbytes(t for t in every_tensor if not t.requires_grad)
    frozen_planned = sum(c.bytes for c in plan.frozen) + sum(n.buffer_bytes for n in plan.networks)
    assert frozen_real == frozen_planned
    assert {c.dtype for c in plan.frozen} == {"bfloat16"}
    assert "reward_vae" in {c.name for c in plan.frozen}

    planned = {"student": plan.networks[0], "fake score": plan.networks[1]}
    roles = {"student": (STUDENT_ROLE, 1.0), "fake score": (GUIDANCE_ROLE, 2.0)}
    groups = {role: module.parameters_of(role) for role, _ in roles.values()}
    optimizer = make_optimizer(
        groups,
        {STUDENT_ROLE: 1e-4, GUIDANCE_ROLE: 1e-4},
        {STUDENT_ROLE: 0.0, GUIDANCE_ROLE: 0.0},
        betas=(0.9, 0.999),
        eps=1e-8,
        use_8bit_adam=use_8bit_adam,
    )
    condition = family.encode_prompts(pipeline, ["a red cat"], 64, torch.device("cpu"))
    # Bytes read off the real tensors, to hold the plan's total against (not the plan's own fields re-added).
    measured_total = frozen_real
    for name, (role, scale) in roles.items():
        parameters = groups[role]
        assert sum(p.numel() for p in parameters) == planned[name].num_parameters
        assert _nbytes(parameters) == planned[name].parameter_bytes
        _backward(module, role, scale, condition)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in parameters)
        assert _nbytes(p.grad for p in parameters) == planned[name].gradient_bytes
        measured_total += _nbytes(parameters) + _nbytes(p.grad for p in parameters)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert _state_bytes(optimizer, parameters, with_shared=False) == planned[name].optimizer_bytes
    all_parameters = [p for params in groups.values() for p in params]
    assert (
        _state_bytes(optimizer, all_parameters, with_shared=True)
        == sum(n.optimizer_bytes for n in plan.networks) + plan.optimizer_shared_bytes
    )
    assert (plan.optimizer_shared_bytes > 0) == use_8bit_adam
    # The total: every real frozen tensor, both networks' parameters and gradients, every optimizer state.
    measured_total += _state_bytes(optimizer, all_parameters, with_shared=True)
    assert plan.total_bytes() == measured_total


def test_8bit_states_quantise_only_tensors_of_4096_elements_or_more():
    # 4095 elements: two float32 moments; 4096: two uint8 moments + two float32 absmax per 256-block.
    assert adamw8bit_state_bytes([(4095,)]) == 8 * 4095
    assert adamw8bit_state_bytes([(64, 64)]) == 2 * 4096 + 8 * 16


def test_fsdp_shard_is_the_largest_dim0_chunk():
    # FSDP2 chunks dim 0 with torch.chunk and pads every shard to the first chunk's size.
    for rows, processes in [(10, 4), (5, 4), (320, 8), (1, 8), (7, 7)]:
        chunks = torch.empty(rows, 3).chunk(processes)
        assert shard_numel((rows, 3), processes) == chunks[0].numel()
    assert shard_numel((), 8) == 1


def test_plan_modes_in_preflight(tiny_teacher_dirs, loaded_teachers, prompt_file, tmp_path, monkeypatch):
    """check_run_inputs stores the plan; cached embeddings move the encoders off the device; FSDP2 shards the
    training module only; the table names every row and says activations are excluded."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    teacher = tiny_teacher_dirs["sd3"]
    base = check_run_inputs(tiny_config(teacher, prompt_file, tmp_path, mixed_precision="bf16")).memory_plan
    assert base.num_processes == 1 and base.total_bytes(fsdp=True) == base.total_bytes()
    cached = check_run_inputs(
        tiny_config(teacher, prompt_file, tmp_path, mixed_precision="bf16", cache_prompt_embeds=True)
    ).memory_plan
    encoder_bytes = sum(c.bytes for c in base.frozen if c.name.startswith("text_encoder"))
    assert encoder_bytes > 0 and cached.host_bytes() == encoder_bytes
    assert cached.total_bytes() == base.total_bytes() - encoder_bytes

    sharded = check_run_inputs(
        tiny_config(teacher, prompt_file, tmp_path, mixed_precision="bf16", memory_plan_num_processes=4)
    ).memory_plan
    replicated = sum(c.bytes for c in sharded.frozen if not c.name.startswith("transformer"))
    backbone = next(c for c in sharded.frozen if c.name.startswith("transformer"))
    real = loaded_teachers["sd3"].transformer
    assert backbone.bytes_per_process_fsdp == sum(2 * shard_numel(tuple(p.shape), 4) for p in real.parameters()) + sum(
        2 * b.numel() for b in real.buffers()
    )
    assert backbone.bytes_per_process_fsdp < backbone.bytes
    assert sharded.frozen_bytes(fsdp=True) == replicated + backbone.bytes_per_process_fsdp
    table = sharded.format_table()
    for row in ["text_encoder_3", "vae", "transformer (shared base)", "student: trainable", "fake score: AdamW"]:
        assert row in table
    assert "activations" in table and "N=4" in table
    as_dict = json.loads(json.dumps(sharded.to_dict()))
    assert as_dict["totals"]["total_bytes_per_process_fsdp"] == sharded.total_bytes(fsdp=True)
    assert [network["name"] for network in as_dict["networks"]] == ["student", "fake score"]
    assert f"{sharded.total_bytes() / GIB:.3f}" in table


def test_training_dtype_follows_accelerate_rules():
    assert training_dtype_for("bf16", {}) == torch.bfloat16
    assert training_dtype_for(None, {"ACCELERATE_MIXED_PRECISION": "fp16"}) == torch.float16
    assert training_dtype_for(None, {}) == torch.float32
    with pytest.raises(ValueError, match="--mixed_precision"):
        training_dtype_for("fp8", {})


def test_train_script_prints_the_plan_before_loading_weights(
    tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch, caplog
):
    """train.py logs the plan table, then loads the teacher (stopped here at the first weight load)."""
    import logging

    from diffusers_dmdr.families import SDXLFamily

    script = Path(__file__).parents[1] / "examples" / "train_dmdr" / "train.py"
    spec = importlib.util.spec_from_file_location("train_dmdr", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    messages_before_load = []

    def first_weight_load(*args, **kwargs):
        messages_before_load.extend(caplog.messages)
        raise RuntimeError("stop before any weight loads")

    monkeypatch.setattr(SDXLFamily, "load_teacher", first_weight_load)
    caplog.set_level(logging.INFO)
    argv = [
        f"--pretrained_model_name_or_path={tiny_teacher_dirs['sdxl']}",
        f"--train_prompts={prompt_file}",
        f"--output_dir={tmp_path}",
        "--resolution=64",
        "--max_train_steps=2",
        "--cold_start_steps=1",
        "--dynamic_steps=1",
        "--report_to=none",
    ]
    with pytest.raises(RuntimeError, match="stop before"):
        train.main(argv)
    plans = [message for message in messages_before_load if "Memory plan: sdxl, lora mode" in message]
    assert len(plans) == 1
    assert "activations" in plans[0] and "unet (shared base)" in plans[0]
