"""The fake-tensor estimate of a DMDR iteration's GPU memory and FLOPs (issue 23).

The calibration cases are held against five H200 measurements (`/work/shared/reference/gpu-floors.md`, bf16, 1024 px,
batch 1): the cheap ones run in `make test`, all five at full size behind `slow` (`make test-slow`, and
`benchmarks/iteration_memory.py` prints them). The iteration tests run reduced architectures (a few seconds each).
"""

import gc
from dataclasses import replace

import pytest
import torch

from diffusers_dmdr.memory_estimate import (
    CANDIDATE_OPTIONS,
    GENERATOR_UPDATE,
    H200_ACTIVATION_GIB,
    AllocationCounter,
    IterationEstimate,
    MemoryOptions,
    activation_peak,
    calibration_case,
    choose_memory_options,
    estimate_iteration,
    fake_tensors,
    frozen_backbone_bytes,
    materialize,
    published_spec,
    quantized_linear_bytes,
)
from diffusers_dmdr.memory_plan import GIB


# A tiny SDXL-shaped UNet and VAE (PLATFORM.md's) at 256 px, and a small CLIP pair in place of the ViT-H/14 towers:
# every pass of the real iteration, in seconds on one core.
SMALL_UNET = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    attention_head_dim=[2, 4],
    block_out_channels=[32, 64],
    cross_attention_dim=64,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    out_channels=4,
    projection_class_embeddings_input_dim=80,
    sample_size=32,
    transformer_layers_per_block=[1, 2],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SMALL_VAE = dict(
    block_out_channels=[8, 8, 8, 8],
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.13025,
)
SMALL_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=224
)
SMALL_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
)


def small_spec(**options) -> object:
    spec = published_spec(
        "sdxl", resolution=256, num_student_steps=2, lora_rank=8, lora_alpha=8, fake_lora_rank=4, fake_lora_alpha=4
    )
    return replace(
        spec,
        backbone_config=SMALL_UNET,
        vae_config=SMALL_VAE,
        num_rewards=2,
        reward_vision_config=dict(SMALL_VISION, projection_dim=32),
        reward_text_config=dict(SMALL_TEXT, projection_dim=32, vocab_size=1000),
        options=MemoryOptions(**options),
    )


# ----------------------------------------------------------------------------------------------------------------
# The counter
# ----------------------------------------------------------------------------------------------------------------
def test_counter_counts_new_storages_not_views_and_releases_freed_ones():
    with fake_tensors():
        source = torch.empty(1000, dtype=torch.float32)
        counter = AllocationCounter()
        with counter:
            view = source.view(10, 100)  # a view: no new memory
            source.mul_(2)  # in place: no new memory
            assert counter.live == 0
            doubled = view * 2  # 4000 bytes, rounded up to 4096
            assert counter.live == 4096
            scratch = torch.empty(10)  # 40 bytes, rounded up to 512
            assert counter.live == 4096 + 512
            del scratch
            gc.collect()
            assert counter.live == 4096
            del doubled
            gc.collect()
        assert counter.live == 0 and counter.peak == 4096 + 512


# ----------------------------------------------------------------------------------------------------------------
# Calibration against the H200
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode_estimates() -> dict[str, float]:
    """The two full-size SDXL VAE decode cases (a few seconds each), in GiB."""
    return {case: calibration_case(case) / GIB for case in ("sdxl-vae-decode", "sdxl-vae-decode-ckpt")}


@pytest.mark.parametrize("case", ["sdxl-vae-decode", "sdxl-vae-decode-ckpt"])
def test_vae_decode_cases_within_10_percent_of_the_h200(case, decode_estimates):
    assert 0.9 <= decode_estimates[case] / H200_ACTIVATION_GIB[case] <= 1.1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sdxl-lora", "sdxl-lora-ckpt", "sd35-large-lora-ckpt"])
def test_backbone_cases_within_10_percent_of_the_h200(case):
    """Full-size SDXL UNet and SD3.5-Large passes: 30-60 s each on one core."""
    assert 0.9 <= calibration_case(case) / GIB / H200_ACTIVATION_GIB[case] <= 1.1


def test_negative_control_the_decode_estimate_tells_checkpointing_apart(decode_estimates):
    """Each decode estimate is outside 10% of the *other* case's H200 figure: the calibration test can fail."""
    assert decode_estimates["sdxl-vae-decode-ckpt"] / H200_ACTIVATION_GIB["sdxl-vae-decode"] < 0.9
    assert decode_estimates["sdxl-vae-decode"] / H200_ACTIVATION_GIB["sdxl-vae-decode-ckpt"] > 1.1


@pytest.mark.slow
def test_reduced_sdxl_checkpointing_cuts_the_lora_pass_as_on_the_h200():
    """At a third of the deepest stack, checkpointing still cuts the LoRA forward + backward by the H200's order (the
    H200: 5.30 -> 0.54 GiB, 10x; the reduced model here keeps most of the per-resolution activations)."""
    plain = calibration_case("sdxl-lora", depth_scale=5)
    checkpointed = calibration_case("sdxl-lora-ckpt", depth_scale=5)
    assert plain > 5 * checkpointed > 0


# ----------------------------------------------------------------------------------------------------------------
# The iteration
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_estimate() -> IterationEstimate:
    return estimate_iteration(small_spec(gradient_checkpointing=True, reward_decode="full"))


def test_iteration_phases_and_persistent_bytes(small_estimate):
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.memory_estimate import build_backbone
    from diffusers_dmdr.memory_plan import meta_model, plan_from_components

    estimate = small_estimate
    assert set(estimate.phases) == {"backward simulation", "fake-score update", "generator update"}
    # The reward decode with grad dominates: the generator update is the peak phase.
    assert estimate.peak_phase == GENERATOR_UPDATE
    assert all(value > 0 for value in estimate.phases.values())
    # Persistent bytes agree with the exact memory plan of the same backbone and adapters.
    spec = small_spec()
    plan = plan_from_components(
        {"unet": meta_model("diffusers", "UNet2DConditionModel", SMALL_UNET).to(torch.bfloat16)},
        get_family("sdxl"),
        "lora",
        torch.bfloat16,
        student_lora={"rank": 8, "alpha": 8, "target_modules": list(get_family("sdxl").student_lora_targets)},
        fake_lora={"rank": 4, "alpha": 4, "target_modules": list(get_family("sdxl").fake_lora_targets)},
        use_8bit_adam=True,
    )
    base, _ = frozen_backbone_bytes(build_backbone(spec), "none")
    assert base == plan.frozen_bytes()
    trainable = sum(value for name, value in estimate.persistent.items() if "LoRA" in name or "AdamW8bit" in name)
    assert trainable == sum(n.parameter_bytes + n.optimizer_bytes for n in plan.networks) + plan.optimizer_shared_bytes
    assert estimate.total_bytes == estimate.persistent_bytes + estimate.activation_peak_bytes + estimate.margin_bytes


@pytest.mark.slow
def test_checkpointing_lowers_the_fake_score_update_peak(small_estimate):
    # (The tiny decoder's saving shows at real size only: this toy VAE is narrower than a TAESD-shaped decoder.)
    plain = estimate_iteration(small_spec(gradient_checkpointing=False, reward_decode="full"), count_flops=False)
    assert small_estimate.phases["fake-score update"] < plain.phases["fake-score update"]


@pytest.mark.slow
def test_flop_counting_does_not_change_the_memory_figures(small_estimate):
    # FlopCounterMode holds tensors while it runs: memory must come from a run without it.
    memory_only = estimate_iteration(small_spec(gradient_checkpointing=True, reward_decode="full"), count_flops=False)
    assert memory_only.phases == small_estimate.phases and memory_only.required_flops == 0


def test_flops_overhead_of_the_iteration_is_at_most_10_percent(small_estimate):
    assert 1.0 <= small_estimate.flops_overhead <= 1.10
    assert 1.0 <= small_estimate.generator_flops_overhead <= 1.10


@pytest.mark.slow
def test_flops_negative_control_a_wasted_real_score_pass_is_flagged():
    """The same iteration with the real score (its CFG batch) run twice: the generator update's overhead exceeds
    1.10, so the check catches wasted passes."""
    from diffusers_dmdr.memory_estimate import REQUIRED_PASSES

    # Without a reward (stage 1) the backbone passes are the whole generator update, as at real size, where the
    # ViT-H/14 towers and the decoder cost a fraction of a backbone pass; the toy towers here would dilute it.
    spec = small_spec(reward_decode="none")
    assert estimate_iteration(spec).generator_flops_overhead <= 1.10
    wasteful = estimate_iteration(spec, passes=(*REQUIRED_PASSES, "real_score"))
    assert wasteful.generator_flops_overhead > 1.10


# ----------------------------------------------------------------------------------------------------------------
# Quantized base (weight arithmetic) and choosing options under a budget
# ----------------------------------------------------------------------------------------------------------------
def test_quantized_linear_bytes():
    # int8: one byte per weight + a float32 scale per row.
    assert quantized_linear_bytes((4096, 4096), "int8") == 16_777_216 + 16_384
    # nf4: half a byte per weight, one byte of absmax per 64 weights, a float32 per 256 blocks.
    assert quantized_linear_bytes((4096, 4096), "nf4") == 8_388_608 + 262_144 + 4_096
    with pytest.raises(ValueError, match="Unknown quantization"):
        quantized_linear_bytes((4, 4), "fp8")


@pytest.mark.slow
def test_a_large_budget_takes_the_first_candidate_after_one_estimate():
    cache = {}
    chosen, table = choose_memory_options(small_spec(), max_memory_gib=1000, cache=cache)
    assert chosen == CANDIDATE_OPTIONS[0] and table.splitlines()[1].endswith("<- chosen")
    assert len(table.splitlines()) == 2 and len(cache) == 1


@pytest.mark.slow
def test_choose_memory_options_takes_the_cheapest_that_fits_or_refuses():
    cache = {}
    spec = small_spec()
    none, table = choose_memory_options(spec, max_memory_gib=0.01, cache=cache)
    assert none is None and "<- chosen" not in table
    # Every candidate is listed with its estimate and the flags that run it.
    assert table.count("GiB") == len(CANDIDATE_OPTIONS) + 1 and "--base_quantization bnb_nf4]" in table
    assert "--reward_vae_gradient_checkpointing --cache_reward_text_features]" in table
    # Quantization and text caching reuse the fake run of the same activation options (six activation options:
    # the offloaded towers' sequential backward is one).
    assert len(cache) == 6
    # The smallest estimate as the budget: the first candidate reaching it is chosen (estimates come from the cache).
    from diffusers_dmdr.memory_estimate import options_estimate

    totals = [options_estimate(spec, options, cache).total_bytes for options in CANDIDATE_OPTIONS]
    budget = min(totals) / GIB
    chosen, table = choose_memory_options(spec, max_memory_gib=budget, cache=cache)
    first_fitting = next(i for i, total in enumerate(totals) if total <= min(totals))
    assert chosen == CANDIDATE_OPTIONS[first_fitting] and len(cache) == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares the estimate with a real step")
@pytest.mark.parametrize(("model", "tolerance"), [("sdxl", 0.15), ("sd35-large", 0.15)])
def test_fake_estimate_matches_the_cuda_peak(model, tolerance):
    """Where a GPU is lent (`pytest -m gpu tests/test_memory_estimate.py`, an H100/H200-class card): one real-size
    iteration of the recipe with the tiny reward decode, run for real on CUDA (uninitialised weights; memory does
    not depend on values), against the fake-tensor estimate of the same iteration, phase by phase."""
    spec = published_spec(model, options=MemoryOptions(reward_decode="tiny"))
    fake = estimate_iteration(spec, count_flops=False)
    real = estimate_iteration(spec, count_flops=False, device="cuda")
    for phase, measured in real.phases.items():
        assert abs(fake.phases[phase] / measured - 1) <= tolerance, (phase, fake.phases[phase], measured)
    assert fake.persistent == real.persistent


# ----------------------------------------------------------------------------------------------------------------
# Preflight: --max_memory_gib
# ----------------------------------------------------------------------------------------------------------------
def test_max_memory_gib_in_preflight_fits_or_refuses_in_one_line(
    tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch
):
    """The tiny SDXL teacher's run, estimated from its own configs before any weight loads: a large budget passes
    and caches the estimate; a budget below the CUDA context alone is refused in one line that names the estimate."""
    from conftest import tiny_config

    from diffusers_dmdr.memory_estimate import estimate_cache_path
    from diffusers_dmdr.preflight import check_run_inputs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    teacher = tiny_teacher_dirs["sdxl"]
    config = tiny_config(teacher, prompt_file, tmp_path / "out", mixed_precision="bf16", max_memory_gib=1000)
    check_run_inputs(config)
    assert estimate_cache_path().is_file()
    small = tiny_config(teacher, prompt_file, tmp_path / "out", mixed_precision="bf16", max_memory_gib=0.1)
    with pytest.raises(ValueError) as raised:
        check_run_inputs(small)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--max_memory_gib 0.1: this run needs an estimated")
    assert "no option this project can estimate fits" in message


def test_max_memory_gib_must_be_positive(prompt_file, tmp_path):
    from conftest import tiny_config

    with pytest.raises(ValueError, match="--max_memory_gib must be positive"):
        tiny_config("unused", prompt_file, tmp_path, max_memory_gib=0)


# ----------------------------------------------------------------------------------------------------------------
# The options are the trainer's flags; the preflight's fast estimate
# ----------------------------------------------------------------------------------------------------------------
def test_memory_options_name_the_trainer_flags():
    options = MemoryOptions(reward_decode="full_checkpointed", cache_reward_text_features=True, quantized_base="nf4")
    assert options.flags() == [
        "--gradient_checkpointing",
        "--reward_vae_gradient_checkpointing",
        "--cache_reward_text_features",
        "--base_quantization bnb_nf4",
    ]
    assert options.estimated_only == []
    assert MemoryOptions(reward_decode="tiny", quantized_base="int8").flags()[1:] == [
        "--reward_vae_model_name_or_path <tiny autoencoder>",
        "--base_quantization bnb_int8",
    ]
    # Every candidate the chooser can name is a real flag set (the towers' checkpointing is not a candidate), and one
    # the trainer accepts for the family's autoencoder.
    from diffusers_dmdr.memory_estimate import candidate_options

    assert all(not options.estimated_only for options in CANDIDATE_OPTIONS)
    assert candidate_options(published_spec("sdxl")) == list(CANDIDATE_OPTIONS)
    qwen = candidate_options(published_spec("qwen-image"))
    assert qwen and all(options.reward_decode != "full_checkpointed" for options in qwen)


def test_options_of_config_reads_the_memory_flags(prompt_file, tmp_path):
    from conftest import tiny_config

    from diffusers_dmdr.memory_estimate import options_of_config

    config = tiny_config(
        "unused",
        prompt_file,
        tmp_path,
        reward=["clip"],
        gradient_checkpointing=True,
        reward_vae_gradient_checkpointing=True,
        cache_reward_text_features=True,
    )
    assert options_of_config(config) == MemoryOptions(
        gradient_checkpointing=True, reward_decode="full_checkpointed", cache_reward_text_features=True
    )
    # The quantized base's config values (the quant branch's `base_quantization`) map to the estimate's schemes.
    for value, scheme in (("bnb_int8", "int8"), ("torchao_int8", "int8"), ("bnb_nf4", "nf4"), ("none", "none")):
        object.__setattr__(config, "base_quantization", value)
        assert options_of_config(config).quantized_base == scheme
    assert options_of_config(replace(config, reward=[])).reward_decode == "none"


def test_reward_decode_estimate_runs_outside_autocast():
    """The decode is modelled as the trainer runs it (VAE dtype, autocast off): under the emulated CUDA autocast the
    same decode's float32 group norms would hold more (the negative control), and the cached estimates of the old
    model are not reused (the cache key's decode revision)."""
    from diffusers_dmdr.memory_estimate import _autocast, _cache_key, build_reward_decoder, decode_latents

    spec = small_spec(reward_decode="full")

    def peak(under_autocast):
        vae = build_reward_decoder(spec)
        with fake_tensors():
            materialize(vae)
            latents = torch.randn(1, 4, 32, 32).requires_grad_(True)

            def run():
                with _autocast():
                    with torch.autocast("cpu", enabled=under_autocast):
                        decode_latents(spec.kind, vae, latents, tiny=False).mean().backward()

            return activation_peak(run)[0]

    assert peak(under_autocast=True) > 1.3 * peak(under_autocast=False)
    full, tiny = small_spec(reward_decode="full"), small_spec(reward_decode="tiny")
    assert _cache_key(full, full.options) != _cache_key(replace(full, vae_config={}), full.options)
    import hashlib
    import json
    from dataclasses import asdict

    def key_before_the_revision(spec):  # the key before the decode revision and the fields added with it
        values = asdict(spec)
        del values["options"]["reward_decode_tile_size"]
        del values["options"]["sequential_reward_backward"]  # added later still
        for name in ("width", "num_frames", "reward_frames"):
            del values[name]
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]

    assert _cache_key(full, full.options) != key_before_the_revision(full)
    assert _cache_key(tiny, tiny.options) == key_before_the_revision(tiny)
    # The published tiny-decoder estimates, made before either change, are still found.
    from pathlib import Path

    published = json.loads((Path(__file__).parents[1] / "docs" / "iteration_memory.json").read_text())["estimates"]
    sdxl_tiny = published_spec("sdxl", options=MemoryOptions(reward_decode="tiny"))
    assert _cache_key(sdxl_tiny, sdxl_tiny.options) in published


def test_scaled_estimate_from_the_published_table():
    """The preflight's table: an entry at 1024 px, batch 1 is scaled by pixels x batch; persistent bytes are exact;
    a run whose architecture or options are not in the table gets none."""
    from diffusers_dmdr.memory_estimate import (
        architecture_key,
        build_backbone,
        build_reward_decoder,
        persistent_bytes,
        scaled_estimate,
    )

    spec = replace(small_spec(reward_decode="tiny"), resolution=1024)
    phases = {"backward simulation": 1000, "fake-score update": 2000, "generator update": 4000}
    table = {architecture_key(spec, build_backbone(spec), build_reward_decoder(spec)): {"phases": phases}}
    larger = scaled_estimate(replace(spec, batch_size=3), table)
    assert larger.phases == {name: value * 3 for name, value in phases.items()}
    assert larger.persistent == persistent_bytes(spec)
    # A smaller run keeps the published peaks (an upper bound: part of each peak does not shrink with the pixels).
    smaller = scaled_estimate(replace(spec, resolution=512), table)
    assert smaller.phases == phases
    cached = scaled_estimate(replace(spec, options=replace(spec.options, cache_reward_text_features=True)), table)
    assert cached.phases == phases and cached.persistent_bytes < larger.persistent_bytes
    assert scaled_estimate(small_spec(reward_decode="full"), table) is None


def test_published_table_covers_every_released_recipe_row():
    from diffusers_dmdr.memory_estimate import published_estimates

    table = published_estimates()
    models = {entry["model"] for entry in table.values()}
    assert {"sdxl", "sd35-large", "flux1-dev", "flux2-klein-4b", "z-image"} <= models
    assert all(
        set(entry["phases"]) == {"backward simulation", "fake-score update", "generator update"}
        for entry in table.values()
    )


def test_preflight_prints_an_estimate_without_a_budget(tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch):
    """Without --max_memory_gib: the cached full estimate when there is one, else one line with the exact persistent
    bytes saying why activations are not estimated (no fake run in the preflight)."""
    import time

    from conftest import tiny_config

    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.memory_estimate import check_memory_budget, describe_run_estimate

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = tiny_config(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "out", mixed_precision="bf16")
    family = get_family("sdxl")
    start = time.perf_counter()
    line = describe_run_estimate(config, family)
    assert time.perf_counter() - start < 10
    assert "\n" not in line and "activations not estimated" in line
    check_memory_budget(replace(config, max_memory_gib=1000), family)  # fills the cache
    report = describe_run_estimate(config, family)
    assert "full estimate of this configuration, cached" in report and "peak of the generator update" in report
    full_mode = describe_run_estimate(replace(config, training_mode="full"), family)
    assert full_mode.startswith("Memory estimate: none for this run") and "--max_memory_gib" not in full_mode


def test_a_wan_clip_iteration_is_estimated():
    """Wan (5-D latents): the whole-clip decode with its graph dominates the generator update, as at real size; the
    stage-1 iteration (no reward) holds far less."""
    from diffusers_dmdr.memory_estimate import IterationSpec, latent_shape

    spec = IterationSpec(
        family="wan",
        backbone_config=dict(
            patch_size=[1, 2, 2],
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        vae_config=dict(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        resolution=64,
        width=96,
        num_frames=9,
        reward_frames=(0, 8),
        num_student_steps=2,
        lora_rank=4,
        lora_alpha=4,
        fake_lora_rank=4,
        fake_lora_alpha=4,
        reward_vision_config=dict(SMALL_VISION, projection_dim=32),
        reward_text_config=dict(SMALL_TEXT, projection_dim=32, vocab_size=1000),
        options=MemoryOptions(reward_decode="full"),
    )
    assert latent_shape(spec.kind, spec.backbone_config, 1, 64, 96, 9) == (1, 16, 3, 8, 12)
    stage2 = estimate_iteration(spec, count_flops=False)
    stage1 = estimate_iteration(spec.with_options(reward_decode="none"), count_flops=False)
    assert stage2.peak_phase == GENERATOR_UPDATE
    assert stage2.phases[GENERATOR_UPDATE] > 2 * stage1.phases[GENERATOR_UPDATE] > 0
