"""Peak GPU memory and FLOPs of a whole DMDR iteration at real size, estimated on a CPU with fake tensors.

[`memory_plan`] is exact for weights, gradients and optimizer states but cannot see activations, which decide whether
a run fits. This module runs the iteration itself, at the real shapes, on fake tensors:

1. every model is built on the meta device from its config, then `to_empty` inside a `FakeTensorMode`, so its
   tensors have shapes and dtypes but no memory (a 20 B backbone costs nothing);
2. [`AllocationCounter`] counts the bytes of every storage an op creates, rounded up to 512 bytes and live until the
   storage dies, as CUDA's caching allocator would see them; views and in-place results share their input's storage
   and are not new memory, and tensors created before counting (the weights) are not counted;
3. the iteration is the sequence of passes the algorithm needs (DESIGN.md section 3), phase by phase: the backward
   simulation (the student's N-step sampler without grad), the fake-score update (forward + backward + optimizer
   step), the generator update (student forward with grad; real score with the CFG batch and fake score without
   grad; the reward decode and reward towers with their backward; the optimizer step).

The peak of a phase is the counter's peak during it; the total is the persistent bytes (frozen weights, trainable
parameters and optimizer states, from the exact [`memory_plan`] arithmetic) plus the largest phase peak, plus a stated
margin for what fake tensors cannot see (the CUDA context and library workspaces, allocator fragmentation). Against
five H200 measurements (`tests/test_memory_estimate.py`, `benchmarks/iteration_memory.py`) the counter lands at
0.92-1.00 of the measured activation peak.

`torch.utils.flop_counter.FlopCounterMode` runs inside the same fake mode, so the FLOPs of the iteration are counted
too and compared with the sum of the passes the algorithm needs (the overhead ratio).

Two limits, both documented where the figures are published (`docs/benchmarks.md`): fake tensors live on the CPU
(indexing fails for fake CUDA tensors on a CPU-only torch build), so CUDA autocast's float32 policy is emulated for
the normalisation ops whose outputs it widens ([`cuda_autocast_float32_norms`]); the attention kernel is the CPU
one, which like the GPU's flash kernel does not materialise the attention matrix.
"""

import functools
import math
import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# The frozen base's (quantized) weight bytes are exact arithmetic on shapes: they live in memory_plan.
from .memory_plan import (
    GIB,
    QUANTIZATIONS,
    adamw8bit_shared_bytes,
    adamw8bit_state_bytes,
    adamw_state_bytes,
    frozen_backbone_bytes,
    quantized_linear_bytes,  # noqa: F401  (part of this module's API)
)


# What fake tensors cannot see, added to every total: the CUDA context and cuBLAS/cuDNN workspaces (~0.5 GiB on an
# H200 with torch 2.11), and the caching allocator's fragmentation plus the counter's own under-estimate (it read
# 0.92-1.00 of five H200 peaks), taken as 10% of the activation peak.
CUDA_CONTEXT_BYTES = GIB // 2
ACTIVATION_MARGIN_FRACTION = 0.10
ALLOCATOR_ROUNDING = 512


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
class AllocationCounter(TorchDispatchMode):
    """Live and peak bytes of the storages that ops run inside this mode create, as a caching allocator sees them.

    A storage counts from the op that creates it until Python frees it (a `weakref.finalize` on the storage). Outputs
    that share a storage with an input (views, in-place ops) are not new memory. `reset_peak()` starts a new phase.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = WeakIdKeyDictionary()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _allocate(self, storage) -> None:
        if storage in self._counted:
            return
        nbytes = -(-storage.nbytes() // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING
        self._counted[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        input_storages = {id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in input_storages:
                self._allocate(tensor.untyped_storage())
        return output


@contextmanager
def cuda_autocast_float32_norms():
    """CUDA autocast's float32 policy for `group_norm` and `layer_norm`, whose widened outputs cost activation memory.

    The fake tensors run on the CPU, whose autocast keeps these ops in bfloat16; CUDA autocast computes them in float32
    and returns float32 (torch's "CUDA ops that can autocast to float32"), so on the GPU their outputs, and what
    consumes them before the next matmul, are twice as large. While this context is active (and CPU autocast is on),
    `torch.nn.functional.group_norm` / `layer_norm` cast their floating inputs to float32 first, as CUDA autocast does.
    The functions are swapped on the module (and restored on exit) rather than intercepted by a `TorchFunctionMode`:
    a mode is not active when gradient checkpointing recomputes a forward inside backward, so recomputed and saved
    tensors would differ in dtype.
    """
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def widened(original):
        @functools.wraps(original)
        def call(input, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and input.dtype in (torch.bfloat16, torch.float16):
                args, kwargs = _widen((args, kwargs))
                with torch.autocast("cpu", enabled=False):
                    return original(input.float(), *args, **kwargs)
            return original(input, *args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(F, name, widened(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


def _widen(tree):
    from torch.utils._pytree import tree_map

    def widen(value):
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
            return value.float()
        return value

    return tree_map(widen, tree)


@contextmanager
def fake_tensors():
    """A `FakeTensorMode` for real-size models on the CPU (modules built on meta are `to_empty`-ed inside it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """A meta-device `module` as fake CPU tensors (call inside [`fake_tensors`])."""
    return module.to_empty(device="cpu")


def activation_peak(run: Callable[[], None], flops: bool = False) -> tuple[int, int]:
    """Bytes of the peak of `run()` above what existed before it, and its FLOPs (0 unless `flops`); inside
    [`fake_tensors`]."""
    counter = AllocationCounter()
    flop_counter = _flop_counter() if flops else nullcontext()
    with flop_counter, counter:
        run()
    return counter.peak, flop_counter.get_total_flops() if flops else 0


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


# ----------------------------------------------------------------------------------------------------------------
# Published architectures (shapes of the released configs; weights are never needed)
# ----------------------------------------------------------------------------------------------------------------
SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.13025,
)
# SD3, SD3.5, FLUX.1 and Z-Image share this 16-channel autoencoder.
FLOW_VAE_16 = dict(
    block_out_channels=[128, 256, 512, 512],
    latent_channels=16,
    layers_per_block=2,
    sample_size=1024,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD35_LARGE = dict(
    attention_head_dim=64,
    caption_projection_dim=2432,
    in_channels=16,
    joint_attention_dim=4096,
    num_attention_heads=38,
    num_layers=38,
    out_channels=16,
    patch_size=2,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
    sample_size=128,
)
FLUX1_DEV = dict(
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
# FLUX.2 [klein] base 4B: 5 double and 20 single blocks of width 3072; text features are three stacked Qwen3-4B
# hidden states (3 x 2560).
FLUX2_KLEIN_4B = dict(
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    mlp_ratio=3.0,
    axes_dims_rope=[32, 32, 32, 32],
    guidance_embeds=False,
)
QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=[16, 56, 56],
)
ZIMAGE = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    qk_norm=True,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
# Wan 2.1 T2V 1.3B (its default autoencoder, `AutoencoderKLWan()`, is the released Wan 2.1 VAE).
WAN21_1_3B = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN21_VAE: dict = {}
# Reward towers: open_clip ViT-H-14 (DFN5B CLIP, HPSv2.1) in transformers' CLIP classes of the same shapes.
CLIP_VIT_H14_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=1024,
    hidden_act="gelu",
)
CLIP_VIT_H14_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=1024,
    hidden_act="gelu",
)


def _tiny_autoencoder(latent_channels: int) -> dict:
    """TAESD-shaped `AutoencoderTiny` config (taesdxl: 4 channels, taesd3/taef1: 16)."""
    return dict(latent_channels=latent_channels, scaling_factor=1.0)


@dataclass(frozen=True)
class BackboneKind:
    """How one family's backbone is called, and its autoencoders.

    Args:
        family: the project's family name (`families.get_family`).
        model_class: the diffusers class of the backbone.
        vae_class: the diffusers class of the full autoencoder.
        spatial_factor: pixels per latent cell as the backbone sees the latent (16 for FLUX.2's 2x2-patchified
            latents).
        text_tokens: conditioning length the family's prompt encoder pads to (SD3: 77 CLIP + 128 T5 tokens).
        real_score_passes: backbone batch multiplier of the real score: 2 for two-pass CFG, 1 for a guidance-distilled
            backbone (FLUX.1 [dev] takes the guidance scale as an embedding).
        video: the backbone denoises `(B, C, F, H, W)` clips (Wan); the rewards score decoded frames.
    """

    family: str
    model_class: str
    vae_class: str
    spatial_factor: int
    text_tokens: int
    real_score_passes: int = 2
    video: bool = False


BACKBONE_KINDS = {
    "sdxl": BackboneKind("sdxl", "UNet2DConditionModel", "AutoencoderKL", 8, 77),
    "sd3": BackboneKind("sd3", "SD3Transformer2DModel", "AutoencoderKL", 8, 205),
    "flux": BackboneKind("flux", "FluxTransformer2DModel", "AutoencoderKL", 8, 512, real_score_passes=1),
    "flux2": BackboneKind("flux2", "Flux2Transformer2DModel", "AutoencoderKLFlux2", 16, 512),
    "qwenimage": BackboneKind("qwenimage", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage", 8, 512),
    "zimage": BackboneKind("zimage", "ZImageTransformer2DModel", "AutoencoderKL", 8, 512),
    "wan": BackboneKind("wan", "WanTransformer3DModel", "AutoencoderKLWan", 8, 512, video=True),
}


def latent_shape(
    kind: BackboneKind, config: dict, batch_size: int, resolution: int, width: int | None = None, num_frames: int = 1
) -> tuple[int, ...]:
    """The latent the backbone denoises (before any token packing), for `resolution` x `width` (square by default);
    video families get `(num_frames - 1) / 4 + 1` latent frames (the causal VAE's temporal factor 4)."""
    height, width = resolution // kind.spatial_factor, (width or resolution) // kind.spatial_factor
    channels = config.get("in_channels", 16)
    if kind.family in ("flux", "qwenimage"):
        channels //= 4  # the config counts the 2x2-packed token width
    if kind.video:
        return (batch_size, channels, (num_frames - 1) // 4 + 1, height, width)
    return (batch_size, channels, height, width)


def condition_for(kind: BackboneKind, config: dict, batch_size: int, dtype: torch.dtype) -> dict:
    """Random prompt conditioning of the family's shapes (create inside [`fake_tensors`])."""
    tokens = kind.text_tokens
    if kind.family == "sdxl":
        return {
            "encoder_hidden_states": torch.randn(batch_size, tokens, config["cross_attention_dim"], dtype=dtype),
            "text_embeds": torch.randn(batch_size, _sdxl_pooled_width(config), dtype=dtype),
            "time_ids": torch.randn(batch_size, 6, dtype=dtype),
        }
    if kind.family == "sd3":
        return {
            "encoder_hidden_states": torch.randn(batch_size, tokens, config["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(batch_size, config["pooled_projection_dim"], dtype=dtype),
        }
    if kind.family == "flux":
        return {
            "encoder_hidden_states": torch.randn(batch_size, tokens, config["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(batch_size, config["pooled_projection_dim"], dtype=dtype),
            "guidance": torch.full((batch_size,), 3.5),
        }
    if kind.family == "flux2":
        return {"encoder_hidden_states": torch.randn(batch_size, tokens, config["joint_attention_dim"], dtype=dtype)}
    if kind.family == "qwenimage":
        return {
            "encoder_hidden_states": torch.randn(batch_size, tokens, config["joint_attention_dim"], dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(batch_size, tokens, dtype=torch.long),
        }
    if kind.family == "zimage":
        return {"prompt_embeds": torch.randn(batch_size, tokens, config["cap_feat_dim"], dtype=dtype)}
    if kind.family == "wan":
        return {"encoder_hidden_states": torch.randn(batch_size, tokens, config["text_dim"], dtype=dtype)}
    raise ValueError(f"No memory estimate for family {kind.family!r}; known: {sorted(BACKBONE_KINDS)}.")


def _sdxl_pooled_width(config: dict) -> int:
    # The added-conditioning projection takes the pooled text embedding and six time ids of this width each.
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def concat_condition(condition: dict, times: int) -> dict:
    """`condition` repeated `times` along the batch (the CFG batch of conditional and unconditional prompts)."""
    return {key: torch.cat([value] * times) for key, value in condition.items()}


def _pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    tokens = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, _, width4 = tokens.shape
    channels = width4 // 4
    latents = tokens.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, height, width)


def call_backbone(kind: BackboneKind, model, latents: torch.Tensor, noise_level: torch.Tensor, condition: dict):
    """The backbone's raw output in the latent layout, called as the family's stock pipeline calls it."""
    if kind.family == "wan":
        return model(
            hidden_states=latents,
            timestep=noise_level * 1000,
            encoder_hidden_states=condition["encoder_hidden_states"],
            return_dict=False,
        )[0]
    batch, _, height, width = latents.shape
    if kind.family == "sdxl":
        added = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]}
        return model(latents, noise_level * 1000, condition["encoder_hidden_states"], added_cond_kwargs=added).sample
    if kind.family == "sd3":
        return model(
            hidden_states=latents,
            timestep=noise_level * 1000,
            encoder_hidden_states=condition["encoder_hidden_states"],
            pooled_projections=condition["pooled_projections"],
        ).sample
    if kind.family == "flux":
        tokens = _pack_2x2(latents)
        output = model(
            hidden_states=tokens,
            timestep=noise_level,
            guidance=condition["guidance"],
            pooled_projections=condition["pooled_projections"],
            encoder_hidden_states=condition["encoder_hidden_states"],
            txt_ids=torch.zeros(condition["encoder_hidden_states"].shape[1], 3),
            img_ids=torch.zeros(tokens.shape[1], 3),
            return_dict=False,
        )[0]
        return _unpack_2x2(output, height, width)
    if kind.family == "flux2":
        tokens = latents.flatten(2).transpose(1, 2)
        output = model(
            hidden_states=tokens,
            timestep=noise_level,
            guidance=None,
            encoder_hidden_states=condition["encoder_hidden_states"],
            txt_ids=torch.zeros(batch, condition["encoder_hidden_states"].shape[1], 4),
            img_ids=torch.zeros(batch, tokens.shape[1], 4),
            return_dict=False,
        )[0]
        return output.transpose(1, 2).reshape(latents.shape)
    if kind.family == "qwenimage":
        output = model(
            hidden_states=_pack_2x2(latents),
            timestep=noise_level,
            encoder_hidden_states=condition["encoder_hidden_states"],
            encoder_hidden_states_mask=condition["encoder_hidden_states_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return _unpack_2x2(output, height, width)
    if kind.family == "zimage":
        output = model(
            list(latents.unsqueeze(2).unbind(0)), 1 - noise_level, list(condition["prompt_embeds"].unbind(0))
        )[0]
        return torch.stack(output).squeeze(2)
    raise ValueError(f"No memory estimate for family {kind.family!r}; known: {sorted(BACKBONE_KINDS)}.")


def decode_latents(kind: BackboneKind, vae, latents: torch.Tensor, tiny: bool) -> torch.Tensor:
    """Images in `[0, 1]` from the backbone's latents through the full autoencoder or a tiny one (with grad)."""
    latents = latents.to(vae.dtype)
    if kind.family == "flux2":
        batch, channels, height, width = latents.shape  # unpatchify 2x2: (B, 4C, H, W) -> (B, C, 2H, 2W)
        latents = latents.view(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
        latents = latents.reshape(batch, channels // 4, height * 2, width * 2)
    if tiny or kind.video:
        images = vae.decode(latents).sample  # Wan: the whole clip, `(B, 3, frames, H, W)`
    elif kind.family == "qwenimage":
        images = vae.decode(latents.unsqueeze(2)).sample[:, :, 0]
    else:
        images = vae.decode(latents / vae.config.get("scaling_factor", 1.0)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# The run to estimate
# ----------------------------------------------------------------------------------------------------------------
REWARD_DECODES = ("full", "full_checkpointed", "tiny", "none")
# The config's `base_quantization` values for the estimate's schemes (the GPU backends; `torchao_int8` is the
# CPU-capable int8 of the same storage arithmetic), and back.
BASE_QUANTIZATION_FLAGS = {"int8": "bnb_int8", "nf4": "bnb_nf4"}
QUANTIZATION_OF_BASE = {"none": "none", "bnb_int8": "int8", "torchao_int8": "int8", "bnb_nf4": "nf4"}
# Bumped per reward decode whenever what the estimate models for it changes, so that cached estimates of the old
# model are not reused: revision 2 decodes outside autocast (no float32 `group_norm`), as the trainer now does. The
# tiny decoder has no normalisation layers, so its estimate did not change.
DECODE_ESTIMATE_REVISION = {"full": 2, "full_checkpointed": 2}


@dataclass(frozen=True)
class MemoryOptions:
    """The memory features of a run (what `--max_memory_gib` chooses among).

    Each option is a trainer flag ([`MemoryOptions.flags`]); the reward decode runs in the autoencoder's weight
    dtype with autocast off, as `DMDRTrainer.decode_for_rewards` does.

    Args:
        gradient_checkpointing: checkpoint the backbone's blocks (the student and fake-score passes with grad;
            `--gradient_checkpointing`).
        reward_decode: `"full"` autoencoder with its graph kept, `"full_checkpointed"` (the autoencoder's own gradient
            checkpointing, `--reward_vae_gradient_checkpointing`), `"tiny"` (a TAESD-shaped `AutoencoderTiny`,
            `--reward_vae_model_name_or_path`), or `"none"` (stage 1, no reward).
        reward_decode_tile_size: decode the full autoencoder in tiles of this many pixels
            (`--reward_vae_tile_size`; with the checkpointed decode the recomputation is one tile at a time).
        reward_tower_checkpointing: checkpoint the reward towers' layers (estimated only: the rewards do not enable
            it; not among the candidates).
        cache_reward_text_features: reward text features computed once per prompt and kept on the host, the text
            towers deleted (`--cache_reward_text_features`).
        quantized_base: `"int8"` / `"nf4"` frozen backbone weights (`--base_quantization bnb_int8` / `bnb_nf4`; the
            bytes are the backend's storage arithmetic, activations those of the bf16 base plus one dequantized layer).
        sequential_reward_backward: every reward offloaded (the reward option `offload=true`: weights on the host,
            streamed per call) and each reward's backward run as soon as it is scored
            (`--sequential_reward_backward`): the towers leave the persistent bytes, and the generator update holds
            one tower's streamed weights and activations at a time.
    """

    gradient_checkpointing: bool = True
    reward_decode: str = "full"
    reward_decode_tile_size: int | None = None
    reward_tower_checkpointing: bool = False
    cache_reward_text_features: bool = False
    quantized_base: str = "none"
    sequential_reward_backward: bool = False

    def __post_init__(self):
        if self.reward_decode not in REWARD_DECODES:
            raise ValueError(f"reward_decode {self.reward_decode!r} is not one of {REWARD_DECODES}.")
        if self.quantized_base not in QUANTIZATIONS:
            raise ValueError(f"quantized_base {self.quantized_base!r} is not one of {QUANTIZATIONS}.")

    @property
    def estimated_only(self) -> list[str]:
        """Options this estimate models that the trainer does not implement."""
        return ["reward_tower_checkpointing"] if self.reward_tower_checkpointing else []

    def flags(self) -> list[str]:
        """The `dmdr-train` flags that run with these options (`--reward_vae_model_name_or_path` takes a TAESD-style
        `AutoencoderTiny` of the family's latent space, e.g. `madebyollin/taesdxl` for SDXL)."""
        flags = ["--gradient_checkpointing"] if self.gradient_checkpointing else []
        if self.reward_decode == "full_checkpointed":
            flags.append("--reward_vae_gradient_checkpointing")
        if self.reward_decode_tile_size is not None:
            flags.append(f"--reward_vae_tile_size {self.reward_decode_tile_size}")
        if self.reward_decode == "tiny":
            flags.append("--reward_vae_model_name_or_path <tiny autoencoder>")
        if self.cache_reward_text_features:
            flags.append("--cache_reward_text_features")
        if self.sequential_reward_backward:
            flags += ["--sequential_reward_backward", "<each --reward with :offload=true>"]
        if self.quantized_base != "none":
            flags.append(f"--base_quantization {BASE_QUANTIZATION_FLAGS[self.quantized_base]}")
        return flags

    def describe(self) -> str:
        parts = ["ckpt" if self.gradient_checkpointing else "no ckpt", f"decode {self.reward_decode}"]
        if self.reward_decode_tile_size is not None:
            parts.append(f"{self.reward_decode_tile_size} px tiles")
        if self.reward_tower_checkpointing:
            parts.append("tower ckpt")
        if self.cache_reward_text_features:
            parts.append("text features cached")
        if self.sequential_reward_backward:
            parts.append("towers offloaded, sequential backward")
        if self.quantized_base != "none":
            parts.append(f"{self.quantized_base} base")
        return ", ".join(parts)


@dataclass(frozen=True)
class IterationSpec:
    """One DMDR iteration to estimate: the backbone, the recipe's shapes and the memory options.

    `backbone_config` is the backbone's `config.json` (a published one from this module, or the teacher's own);
    `vae_config` the full autoencoder's. Prompt embeddings are cached (`--cache_prompt_embeds`), so text encoders
    are not on the device. Each of the `num_rewards` rewards is a CLIP-style pair of towers of
    `reward_vision_config` / `reward_text_config` (default: ViT-H/14, the shape of DFN5B CLIP and HPSv2.1).
    """

    family: str
    backbone_config: dict
    vae_config: dict
    resolution: int = 1024
    batch_size: int = 1
    num_student_steps: int = 4
    update_ratio: int = 5
    lora_rank: int = 64
    lora_alpha: float = 128
    fake_lora_rank: int = 32
    fake_lora_alpha: float = 32
    lora_target_modules: tuple[str, ...] | None = None
    fake_score_lora_scale: float = 2.0
    real_score_lora_scale: float = 0.5
    use_8bit_adam: bool = True
    num_rewards: int = 2
    width: int | None = None
    num_frames: int | None = None
    reward_frames: tuple[int, ...] | None = None
    reward_vision_config: dict = field(default_factory=lambda: dict(CLIP_VIT_H14_VISION))
    reward_text_config: dict = field(default_factory=lambda: dict(CLIP_VIT_H14_TEXT))
    options: MemoryOptions = field(default_factory=MemoryOptions)

    @property
    def kind(self) -> BackboneKind:
        if self.family not in BACKBONE_KINDS:
            raise ValueError(f"No memory estimate for family {self.family!r}; known: {sorted(BACKBONE_KINDS)}.")
        return BACKBONE_KINDS[self.family]

    def with_options(self, **changes) -> "IterationSpec":
        return replace(self, options=replace(self.options, **changes))


@dataclass
class IterationEstimate:
    """Bytes (per GPU) and FLOPs of one DMDR iteration; see [`estimate_iteration`]."""

    persistent: dict[str, int]
    phases: dict[str, int]
    flops: dict[str, int]
    required_flops: int
    required_generator_flops: int
    options: dict
    estimated_only: list[str]

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def activation_peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def margin_bytes(self) -> int:
        return CUDA_CONTEXT_BYTES + int(ACTIVATION_MARGIN_FRACTION * self.activation_peak_bytes)

    @property
    def total_bytes(self) -> int:
        """Persistent bytes + the largest phase peak + the margin: what the GPU must hold."""
        return self.persistent_bytes + self.activation_peak_bytes + self.margin_bytes

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def flops_overhead(self) -> float:
        """FLOPs counted over the FLOPs of the passes the algorithm needs (1.0: nothing wasted)."""
        return self.total_flops / self.required_flops if self.required_flops else float("nan")

    @property
    def generator_flops_overhead(self) -> float:
        """The same ratio for the generator update alone (a wasted CFG half shows here first)."""
        required = self.required_generator_flops
        return self.flops[GENERATOR_UPDATE] / required if required else float("nan")

    def to_dict(self) -> dict:
        values = asdict(self)
        values.update(
            persistent_bytes=self.persistent_bytes,
            activation_peak_bytes=self.activation_peak_bytes,
            margin_bytes=self.margin_bytes,
            total_bytes=self.total_bytes,
            total_flops=self.total_flops,
            flops_overhead=self.flops_overhead,
            generator_flops_overhead=self.generator_flops_overhead,
        )
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "IterationEstimate":
        names = ("persistent", "phases", "flops", "required_flops", "required_generator_flops", "options")
        names += ("estimated_only",)
        return cls(**{name: values[name] for name in names})


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def _meta(library: str, class_name: str, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers.utils import logging as diffusers_logging

    from .memory_plan import meta_model

    verbosity = diffusers_logging.get_verbosity()
    # Casting a meta model with `.to(dtype)` makes diffusers warn about modules kept in float32 (none here).
    diffusers_logging.set_verbosity_error()
    try:
        return meta_model(library, class_name, config).to(dtype).requires_grad_(False).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)


def build_backbone(spec: IterationSpec, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The meta backbone in `dtype` with the `student` and `fake` LoRA adapters (float32, as the trainer keeps
    trainable parameters), built through the project's own `add_lora_adapter`."""
    from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER, add_lora_adapter
    from .families import get_family

    family = get_family(spec.family)
    backbone = _meta("diffusers", spec.kind.model_class, spec.backbone_config, dtype)
    student_targets = list(spec.lora_target_modules or family.student_lora_targets)
    fake_targets = list(spec.lora_target_modules or family.fake_lora_targets)
    with torch.device("meta"):
        add_lora_adapter(backbone, STUDENT_ADAPTER, spec.lora_rank, spec.lora_alpha, student_targets)
        add_lora_adapter(backbone, FAKE_ADAPTER, spec.fake_lora_rank, spec.fake_lora_alpha, fake_targets)
    for name, parameter in backbone.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)
    return backbone


def build_reward_decoder(spec: IterationSpec, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module | None:
    decode = spec.options.reward_decode
    if decode == "none":
        return None
    if decode == "tiny":
        channels = latent_shape(spec.kind, spec.backbone_config, 1, spec.resolution, spec.width, spec.num_frames or 1)[
            1
        ]
        if spec.family == "flux2":
            channels //= 4  # the autoencoder's latent is the backbone's, unpatchified 2x2
        return _meta("diffusers", "AutoencoderTiny", _tiny_autoencoder(channels), dtype)
    vae = _meta("diffusers", spec.kind.vae_class, spec.vae_config, dtype)
    if decode == "full_checkpointed":
        from .reward_decode import enable_reward_decode_checkpointing

        enable_reward_decode_checkpointing(vae)
    return vae


def build_reward_towers(spec: IterationSpec, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per reward, its ViT-H/14 image tower and (unless features are cached) its text tower, frozen."""
    if spec.options.reward_decode == "none":
        return []
    towers = []
    for _ in range(spec.num_rewards):
        vision = _meta("transformers", "CLIPVisionModelWithProjection", spec.reward_vision_config, dtype)
        if spec.options.reward_tower_checkpointing:
            vision.gradient_checkpointing_enable()
            vision.train()
        text = None
        if not spec.options.cache_reward_text_features:
            text = _meta("transformers", "CLIPTextModelWithProjection", spec.reward_text_config, dtype)
        towers.append({"vision": vision, "text": text})
    return towers


def _module_bytes(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad == trainable) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


# ----------------------------------------------------------------------------------------------------------------
# The iteration
# ----------------------------------------------------------------------------------------------------------------
SIMULATION = "backward simulation"
FAKE_UPDATE = "fake-score update"
GENERATOR_UPDATE = "generator update"
# The passes one iteration needs (DESIGN.md section 3), in the order they run.
REQUIRED_PASSES = ("simulation", "fake_update", "student", "real_score", "fake_score", "reward")


def estimate_iteration(
    spec: IterationSpec, passes: tuple[str, ...] = REQUIRED_PASSES, count_flops: bool = True, device: str = "fake"
) -> IterationEstimate:
    """Persistent bytes, per-phase activation peaks and FLOPs of one DMDR iteration of `spec` at real size.

    One iteration is what the trainer does per generator update: `update_ratio` times a backward simulation and a
    fake-score update, then one generator update. Their memory is the same each time, so the simulation and the
    fake-score update run once and their FLOPs count `update_ratio` times. `passes` lists the passes to run (default:
    the ones the algorithm needs; a pass named twice runs twice, which the FLOPs overhead then shows).
    `count_flops=False` skips the FLOP counter and the unit passes (faster; the FLOPs fields are then 0).

    `device="cuda"` runs the same iteration for real on a GPU (weights uninitialised, `torch.cuda` peak statistics
    instead of the counter, CUDA autocast): the check of the estimate where a GPU is lent
    (`tests/test_memory_estimate.py::test_fake_estimate_matches_the_cuda_peak`).
    """
    from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER, AdapterRouter
    from .method.losses import dmd_loss, fake_score_loss

    kind, options, dtype, batch = spec.kind, spec.options, torch.bfloat16, spec.batch_size
    backbone = build_backbone(spec, dtype)
    if options.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
        backbone.train()
    decoder = build_reward_decoder(spec, dtype)
    towers = build_reward_towers(spec, dtype)
    persistent = _persistent_bytes(spec, backbone, decoder, towers)
    student_parameters = [p for n, p in backbone.named_parameters() if f".{STUDENT_ADAPTER}." in n]
    fake_parameters = [p for n, p in backbone.named_parameters() if f".{FAKE_ADAPTER}." in n]
    on_gpu = device != "fake"
    counter = CudaPeak() if on_gpu else AllocationCounter()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else _autocast
    phases, unit = {}, {}

    with torch.device(device) if on_gpu else fake_tensors():
        for module in [backbone, decoder, *(t for tower in towers for t in tower.values())]:
            if module is not None:
                module.to_empty(device=device) if on_gpu else materialize(module)
        router = AdapterRouter(backbone)
        student_optimizer = _optimizer(student_parameters, spec.use_8bit_adam)
        fake_optimizer = _optimizer(fake_parameters, spec.use_8bit_adam)
        shape = latent_shape(kind, dict(backbone.config), batch, spec.resolution, spec.width, spec.num_frames or 1)
        condition = condition_for(kind, dict(backbone.config), batch, dtype)
        uncondition = condition_for(kind, dict(backbone.config), batch, dtype)
        reward_prompt_ids = torch.zeros(batch, 77, dtype=torch.long)

        def backbone_x0(latents, noise_level, cond):
            # One convention for every family: x0 = x_t - t v (epsilon or v backbones differ by elementwise ops on
            # the latent, which cost nothing next to a pass).
            output = call_backbone(kind, backbone, latents, noise_level, cond)
            return latents - _expand(noise_level, latents) * output.to(latents.dtype)

        def simulate():
            # The student's N-step sampler without grad, re-noising each x0 to the next level with fresh noise.
            with torch.no_grad():
                router.route(STUDENT_ADAPTER, 1.0)
                sample = torch.randn(shape, dtype=dtype)
                for step in range(spec.num_student_steps):
                    level = torch.full((batch,), 1.0 - step / spec.num_student_steps)
                    clean = backbone_x0(sample, level, condition)
                    sample = _renoise(clean, torch.randn_like(clean), level * 0.75)
            return clean, sample

        def fake_update(clean):
            # Denoising loss of the fake score on the detached student sample, backward, one optimizer step.
            router.route(FAKE_ADAPTER, spec.fake_score_lora_scale)
            noise, level = torch.randn_like(clean), torch.full((batch,), 0.6)
            output = call_backbone(kind, backbone, _renoise(clean, noise, level), level, condition)
            fake_score_loss(output.float(), (noise - clean).float()).backward()
            _step(fake_optimizer, fake_parameters)

        def real_score(noisy, level):
            with torch.no_grad():
                router.route(FAKE_ADAPTER, spec.real_score_lora_scale)
                if kind.real_score_passes == 1:
                    return backbone_x0(noisy, level, condition)
                x0_cond, x0_uncond = backbone_x0(
                    torch.cat([noisy, noisy]), torch.cat([level, level]), _cat_conditions(condition, uncondition)
                ).chunk(2)
                return x0_uncond + 4.0 * (x0_cond - x0_uncond)

        def fake_score(noisy, level):
            with torch.no_grad():
                router.route(FAKE_ADAPTER, spec.fake_score_lora_scale)
                return backbone_x0(noisy, level, condition)

        def iterate(counter, flop_counter, phases, unit):
            def counted(name, run, *args):
                before = flop_counter.get_total_flops()
                result = run(*args)
                unit[name] = unit.get(name, 0) + flop_counter.get_total_flops() - before
                return result

            with flop_counter, counter, autocast():
                counter.reset_peak()
                for _ in range(passes.count("simulation")):
                    clean, student_input = counted("simulation", simulate)
                phases[SIMULATION] = counter.peak

                counter.reset_peak()
                for _ in range(passes.count("fake_update")):
                    counted("fake_update", fake_update, clean)
                phases[FAKE_UPDATE] = counter.peak

                counter.reset_peak()
                router.route(STUDENT_ADAPTER, 1.0)
                level = torch.full((batch,), 0.75)
                x0_student = counted("student", backbone_x0, student_input, level, condition)
                dmd_level = torch.full((batch,), 0.5)
                noisy = _renoise(x0_student.detach(), torch.randn_like(x0_student), dmd_level)
                x0_real = x0_fake = None
                for _ in range(passes.count("real_score")):
                    x0_real = counted("real_score", real_score, noisy, dmd_level)
                for _ in range(passes.count("fake_score")):
                    x0_fake = counted("fake_score", fake_score, noisy, dmd_level)
                loss = dmd_loss(x0_student.float(), x0_real.float(), x0_fake.float())
                del x0_real, x0_fake, noisy
                if decoder is not None:
                    for _ in range(passes.count("reward")):
                        loss = loss + counted(
                            "reward", _reward_loss, spec, decoder, towers, x0_student, reward_prompt_ids
                        )

                def generator_backward(loss):
                    # Checkpointing recomputes the student's forward during backward: route to it again first.
                    router.route(STUDENT_ADAPTER, 1.0)
                    loss.backward()
                    _step(student_optimizer, student_parameters)

                counted("generator_backward", generator_backward, loss)
                del x0_student, loss
                phases[GENERATOR_UPDATE] = counter.peak

        # Memory and FLOPs are counted in two runs of the same iteration: `FlopCounterMode` keeps tensors alive (its
        # module tracking holds them until backward), which would inflate the memory peaks several-fold.
        iterate(counter, _NoFlops(), phases, {})
        if count_flops:
            iterate(_NoCounter(), _flop_counter(), {}, unit)

        reference = {"forward": 0, "forward_backward": 0, "reward": 0}
        if count_flops:
            with autocast():
                reference = _reference_flops(
                    spec, backbone, router, backbone_x0, shape, condition, decoder, towers, reward_prompt_ids
                )

    repeats = spec.update_ratio
    flops = {
        SIMULATION: repeats * unit.get("simulation", 0),
        FAKE_UPDATE: repeats * unit.get("fake_update", 0),
        GENERATOR_UPDATE: sum(v for k, v in unit.items() if k not in ("simulation", "fake_update")),
    }
    return IterationEstimate(
        persistent=persistent,
        phases=phases,
        flops=flops,
        required_flops=required_flops(spec, reference),
        required_generator_flops=required_flops(spec, reference, generator_only=True),
        options=asdict(options),
        estimated_only=options.estimated_only,
    )


class _NoFlops(nullcontext):
    def get_total_flops(self) -> int:
        return 0


class _NoCounter(nullcontext):
    peak = 0

    def reset_peak(self) -> None:
        pass


class CudaPeak:
    """`AllocationCounter`'s interface over `torch.cuda`'s statistics: bytes allocated above what was allocated when
    the context was entered (the weights), and the peak of each phase since `reset_peak()`."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        self.reset_peak()
        return self

    def __exit__(self, *exc):
        return False

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    @property
    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.start


def _reward_loss(spec: IterationSpec, decoder, towers, latents, prompt_ids) -> torch.Tensor:
    """Decode with grad (in the autoencoder's dtype, autocast off, as `DMDRTrainer.decode_for_rewards`), resize to
    the towers' 224 px, and hinge each tower's image-text cosine (the towers are frozen, under autocast; the gradient
    flows to the image only). Text features come from the text tower without grad each step unless they are cached
    (`--cache_reward_text_features`)."""
    # Autocast off for the decode: on fake tensors this also turns off the CUDA float32-norm emulation, which reads
    # the CPU autocast state.
    from .reward_decode import reward_decode_tiling

    tile_size = spec.options.reward_decode_tile_size
    with torch.autocast(latents.device.type, enabled=False), reward_decode_tiling(decoder, tile_size):
        images = decode_latents(spec.kind, decoder, latents, tiny=spec.options.reward_decode == "tiny")
    if images.ndim == 5:
        # Video: the image rewards score the `reward_frames` of each clip (`rewards/video.py`), one batch of frames.
        frames = list(spec.reward_frames or range(images.shape[2]))
        images = images[:, :, frames].transpose(1, 2).flatten(0, 1)
        prompt_ids = prompt_ids.repeat_interleave(len(frames), dim=0)
    if spec.options.sequential_reward_backward:
        return _sequential_tower_losses(spec, towers, images, prompt_ids)
    pixels = _tower_pixels(spec, images)
    loss = torch.zeros(())
    for tower in towers:
        loss = loss + _tower_loss(tower, pixels, prompt_ids)
    return loss


def _tower_pixels(spec: IterationSpec, images: torch.Tensor) -> torch.Tensor:
    size = spec.reward_vision_config.get("image_size", 224)
    pixels = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True)
    return ((pixels - 0.45) / 0.27).to(torch.bfloat16)


def _tower_loss(tower: dict, pixels: torch.Tensor, prompt_ids: torch.Tensor, call=None) -> torch.Tensor:
    """One reward's hinged image-text cosine; `call(module, **inputs)` runs a tower (default: with its own
    weights)."""
    call = call or (lambda module, **inputs: module(**inputs))
    image_embeds = F.normalize(call(tower["vision"], pixel_values=pixels).image_embeds.float(), dim=-1)
    if tower["text"] is not None:
        with torch.no_grad():
            text_embeds = call(tower["text"], input_ids=prompt_ids).text_embeds.float()
    else:
        text_embeds = torch.randn(image_embeds.shape[0], image_embeds.shape[-1])
    score = (image_embeds * F.normalize(text_embeds, dim=-1)).sum(-1)
    return torch.relu(0.7 - score).mean()


def _sequential_tower_losses(spec: IterationSpec, towers, images, prompt_ids) -> torch.Tensor:
    """`rewards.compute_reward_loss_sequentially` with offloaded towers: each reward's weights (its image tower, and
    its text tower unless the text features are cached) are streamed to the device at once, as
    `FrozenReward(offload=True)` does (copies, counted); it scores a leaf cut from the images and its loss is
    back-propagated to the leaf right away, which frees the copies and activations before the next reward; the
    images' surrogate carries the summed gradient through the decode in the generator's backward."""
    leaf = images.detach().requires_grad_()
    for tower in towers:
        modules = [module for module in tower.values() if module is not None]
        streamed = {
            module: {name: tensor.clone() for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
            for module in modules
        }

        def streamed_call(module, streamed=streamed, **inputs):
            return torch.func.functional_call(module, streamed[module], (), inputs)

        loss = _tower_loss(tower, _tower_pixels(spec, leaf), prompt_ids, streamed_call)
        del streamed, streamed_call  # from here the graph alone holds the copies
        loss.backward()
    if leaf.grad is None:  # no tower
        return torch.zeros(())
    surrogate = (images.float() * leaf.grad.float()).sum()
    return surrogate - surrogate.detach()


def _reference_flops(spec, backbone, router, backbone_x0, shape, condition, decoder, towers, text_ids) -> dict:
    from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER

    batch, reference = shape[0], {}
    level = torch.full((batch,), 0.5)
    with _flop_counter() as counter, torch.no_grad():
        router.route(STUDENT_ADAPTER, 1.0)
        backbone_x0(torch.randn(shape, dtype=torch.bfloat16), level, condition)
    reference["forward"] = counter.get_total_flops()
    with _flop_counter() as counter:
        router.route(FAKE_ADAPTER, spec.fake_score_lora_scale)
        backbone_x0(torch.randn(shape, dtype=torch.bfloat16), level, condition).float().mean().backward()
    reference["forward_backward"] = counter.get_total_flops()
    for parameter in backbone.parameters():
        parameter.grad = None
    reference["reward"] = 0
    if decoder is not None:
        latents = torch.randn(shape, dtype=torch.bfloat16).requires_grad_(True)
        with _flop_counter() as counter:
            _reward_loss(spec, decoder, towers, latents, text_ids).backward()
        reference["reward"] = counter.get_total_flops()
    return reference


def required_flops(spec: IterationSpec, reference: dict[str, int], generator_only: bool = False) -> int:
    """FLOPs of the passes the algorithm needs (DESIGN.md section 3), from unit costs counted apart.

    `f`: one backbone forward at batch `B`; `fb`: one forward + backward of a LoRA route (including the recomputed
    forward when checkpointing is on); `r`: the reward decode and towers forward + backward. Per generator update:
    `update_ratio * (N f + fb)` for the simulations and fake-score updates, then `fb` for the student,
    `real_score_passes * f` for the real score (two CFG branches, or one pass at a guidance embedding), `f` for the
    fake score and `r`. Everything else (noise, losses, clipping, the optimizer) counts as overhead.
    """
    forward, forward_backward, reward = reference["forward"], reference["forward_backward"], reference["reward"]
    generator = forward_backward + spec.kind.real_score_passes * forward + forward + reward
    if generator_only:
        return generator
    return spec.update_ratio * (spec.num_student_steps * forward + forward_backward) + generator


def _expand(noise_level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return noise_level.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _renoise(clean: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    level = _expand(noise_level, clean)
    return (1 - level) * clean + level * noise


def _cat_conditions(condition: dict, uncondition: dict) -> dict:
    return {key: torch.cat([condition[key], uncondition[key]]) for key in condition}


def _optimizer(parameters: list[torch.nn.Parameter], use_8bit_adam: bool):
    """torch's AdamW with its states made before counting (their bytes are persistent, from the plan), so the
    counter sees only the step's temporaries; `None` for 8-bit AdamW, whose fused kernel updates each tensor in
    place (no temporaries beyond one block)."""
    if use_8bit_adam or not parameters:
        return None
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, foreach=True)
    for parameter in parameters:
        optimizer.state[parameter] = {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(parameter),
            "exp_avg_sq": torch.zeros_like(parameter),
        }
    return optimizer


def _step(optimizer, parameters: list[torch.nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    if optimizer is not None:
        optimizer.step()
    for parameter in parameters:
        parameter.grad = None


@contextmanager
def _autocast():
    # The trainer runs every pass under accelerate's autocast (bf16): CPU autocast plus CUDA's float32 policy.
    with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast_float32_norms():
        yield


def _persistent_bytes(spec: IterationSpec, backbone, decoder, towers) -> dict[str, int]:
    """What stays on the device for the whole run: frozen weights, trainable parameters, optimizer states."""
    from .adapters import FAKE_ADAPTER, STUDENT_ADAPTER

    base, _ = frozen_backbone_bytes(backbone, spec.options.quantized_base)
    persistent = {f"frozen {spec.kind.model_class}" + _quant_suffix(spec.options): base}
    if decoder is not None:
        persistent[f"reward decoder ({spec.options.reward_decode})"] = _module_bytes(decoder)
    # Offloaded towers (`sequential_reward_backward`) live on the host; the generator update streams them.
    if towers and not spec.options.sequential_reward_backward:
        persistent["reward image towers"] = sum(_module_bytes(t["vision"]) for t in towers)
        text = sum(_module_bytes(t["text"]) for t in towers if t["text"] is not None)
        if text:
            persistent["reward text towers"] = text
    all_shapes = []
    for name, adapter in (("student", STUDENT_ADAPTER), ("fake score", FAKE_ADAPTER)):
        shapes = [tuple(p.shape) for n, p in backbone.named_parameters() if f".{adapter}." in n]
        all_shapes += shapes
        states = adamw8bit_state_bytes(shapes) if spec.use_8bit_adam else adamw_state_bytes(shapes)
        persistent[f"{name} LoRA (fp32) + optimizer states"] = 4 * sum(math.prod(s) for s in shapes) + states
    if spec.use_8bit_adam:
        persistent["AdamW8bit quantisation maps"] = adamw8bit_shared_bytes(all_shapes)
    return persistent


def persistent_bytes(spec: IterationSpec) -> dict[str, int]:
    """The persistent part of the estimate alone (meta models, no fake run: seconds at any size)."""
    backbone = build_backbone(spec)
    return _persistent_bytes(spec, backbone, build_reward_decoder(spec), build_reward_towers(spec))


def _quant_suffix(options: MemoryOptions) -> str:
    return "" if options.quantized_base == "none" else f" ({options.quantized_base})"


# ----------------------------------------------------------------------------------------------------------------
# Calibration: the five H200 measurements (reference/gpu-floors.md, 2026-11-26, torch 2.11, bf16, 1024 px, batch 1)
# ----------------------------------------------------------------------------------------------------------------
H200_ACTIVATION_GIB = {
    "sdxl-lora": 5.300,
    "sdxl-lora-ckpt": 0.536,
    "sdxl-vae-decode": 11.631,
    "sdxl-vae-decode-ckpt": 6.594,
    "sd35-large-lora-ckpt": 1.272,
}
CALIBRATION_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def calibration_case(name: str, depth_scale: int = 1) -> int:
    """Activation peak in bytes of one H200 calibration case, measured as on the GPU: pure bf16 (no autocast), LoRA
    adapters in bf16 added with `add_adapter`, forward + backward of a scalar loss.

    `depth_scale > 1` divides the SDXL UNet's deepest transformer stack / SD3.5's layer count (a cheaper case; the
    H200 figure then no longer applies).
    """
    from peft import LoraConfig

    dtype = torch.bfloat16
    if name.startswith("sdxl-lora"):
        config = dict(SDXL_UNET, transformer_layers_per_block=[1, 2, max(1, 10 // depth_scale)])
        model = _meta("diffusers", "UNet2DConditionModel", config, dtype)
        model.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=CALIBRATION_LORA_TARGETS))
    elif name.startswith("sdxl-vae"):
        model = _meta("diffusers", "AutoencoderKL", SDXL_VAE, dtype)
    elif name.startswith("sd35"):
        config = dict(SD35_LARGE, num_layers=max(1, SD35_LARGE["num_layers"] // depth_scale))
        model = _meta("diffusers", "SD3Transformer2DModel", config, dtype)
        model.add_adapter(LoraConfig(r=64, lora_alpha=128, target_modules=CALIBRATION_LORA_TARGETS))
    else:
        raise ValueError(f"Unknown calibration case {name!r}; known: {sorted(H200_ACTIVATION_GIB)}.")
    if name.endswith("ckpt"):
        model.train()
        model.enable_gradient_checkpointing()
    with fake_tensors():
        materialize(model)
        if name.startswith("sdxl-lora"):
            latents, level = torch.randn(1, 4, 128, 128, dtype=dtype), torch.full((1,), 500.0)
            text = torch.randn(1, 77, 2048, dtype=dtype)
            added = {"text_embeds": torch.randn(1, 1280, dtype=dtype), "time_ids": torch.randn(1, 6, dtype=dtype)}

            def run():
                model(latents, level, text, added_cond_kwargs=added).sample.float().pow(2).mean().backward()

        elif name.startswith("sdxl-vae"):
            latents = torch.randn(1, 4, 128, 128, dtype=dtype).requires_grad_(True)

            def run():
                model.decode(latents).sample.float().mean().backward()

        else:
            latents, level = torch.randn(1, 16, 128, 128, dtype=dtype), torch.full((1,), 500.0)
            text, pooled = torch.randn(1, 333, 4096, dtype=dtype), torch.randn(1, 2048, dtype=dtype)

            def run():
                output = model(
                    hidden_states=latents, timestep=level, encoder_hidden_states=text, pooled_projections=pooled
                ).sample
                output.float().pow(2).mean().backward()

        peak, _ = activation_peak(run)
    return peak


# ----------------------------------------------------------------------------------------------------------------
# Recipes at real size, and choosing options under a budget
# ----------------------------------------------------------------------------------------------------------------
QWEN_IMAGE_VAE: dict = {}  # AutoencoderKLQwenImage's defaults are the released Qwen-Image VAE
FLUX2_VAE: dict = {}  # AutoencoderKLFlux2's defaults are the released FLUX.2 VAE

PUBLISHED = {
    "sdxl": (SDXL_UNET, SDXL_VAE),
    "sd35-large": (SD35_LARGE, FLOW_VAE_16),
    "flux1-dev": (FLUX1_DEV, FLOW_VAE_16),
    "flux2-klein-4b": (FLUX2_KLEIN_4B, FLUX2_VAE),
    "qwen-image": (QWEN_IMAGE, QWEN_IMAGE_VAE),
    "z-image": (ZIMAGE, FLOW_VAE_16),
    "wan21-t2v-1.3b": (WAN21_1_3B, WAN21_VAE),
}
PUBLISHED_FAMILY = {
    "sdxl": "sdxl",
    "sd35-large": "sd3",
    "flux1-dev": "flux",
    "flux2-klein-4b": "flux2",
    "qwen-image": "qwenimage",
    "z-image": "zimage",
    "wan21-t2v-1.3b": "wan",
}
# The video recipes' clip (`examples/train_dmdr/configs/wan21_t2v_1.3b_4step.yaml`): 480 x 832 x 81 frames, five
# scored frames.
PUBLISHED_VIDEO = {"wan21-t2v-1.3b": dict(resolution=480, width=832, num_frames=81, reward_frames=(0, 20, 40, 60, 80))}


def published_spec(model: str, options: MemoryOptions | None = None, **recipe) -> IterationSpec:
    """The iteration of a released model's recipe (`examples/train_dmdr/configs`) at its published shapes."""
    backbone_config, vae_config = PUBLISHED[model]
    defaults = dict(lora_rank=64, lora_alpha=64 if model == "sdxl" else 128, **PUBLISHED_VIDEO.get(model, {}))
    return IterationSpec(
        family=PUBLISHED_FAMILY[model],
        backbone_config=backbone_config,
        vae_config=vae_config,
        options=options or MemoryOptions(),
        **{**defaults, **recipe},
    )


# Candidate options from cheapest (no cost in speed or fidelity) to most expensive; `--max_memory_gib` takes the
# first that fits. Checkpointing costs a recomputed forward; the checkpointed decode another decode; the tiny decoder
# changes what the rewards see; a quantized base changes the teacher.
CANDIDATE_OPTIONS = (
    MemoryOptions(gradient_checkpointing=False, reward_decode="full"),
    MemoryOptions(gradient_checkpointing=True, reward_decode="full"),
    MemoryOptions(gradient_checkpointing=True, reward_decode="full_checkpointed"),
    MemoryOptions(gradient_checkpointing=True, reward_decode="full_checkpointed", cache_reward_text_features=True),
    MemoryOptions(
        gradient_checkpointing=True,
        reward_decode="full_checkpointed",
        reward_decode_tile_size=512,
        cache_reward_text_features=True,
    ),
    MemoryOptions(gradient_checkpointing=True, reward_decode="tiny"),
    MemoryOptions(gradient_checkpointing=True, reward_decode="tiny", cache_reward_text_features=True),
    MemoryOptions(
        gradient_checkpointing=True,
        reward_decode="tiny",
        cache_reward_text_features=True,
        sequential_reward_backward=True,
    ),
    MemoryOptions(
        gradient_checkpointing=True, reward_decode="tiny", cache_reward_text_features=True, quantized_base="int8"
    ),
    MemoryOptions(
        gradient_checkpointing=True, reward_decode="tiny", cache_reward_text_features=True, quantized_base="nf4"
    ),
)


def _activation_options(options: MemoryOptions) -> MemoryOptions:
    """The options that change the activation peaks: quantization changes persistent bytes only (plus one dequantized
    layer, added after), and so does text-feature caching, except for offloaded towers, whose text tower is streamed
    in with the image tower (a cached run streams the image tower alone)."""
    cached_text = options.cache_reward_text_features and options.sequential_reward_backward
    return replace(options, quantized_base="none", cache_reward_text_features=cached_text)


def options_estimate(
    spec: IterationSpec, options: MemoryOptions, cache: dict | None = None, count_flops: bool = False
) -> IterationEstimate:
    """The estimate of `spec` under `options`. Quantization and text-feature caching change persistent bytes only
    (plus a dequantized layer for a quantized base), so they reuse the fake run of the same activation options."""
    activation_options = _activation_options(options)
    key = _cache_key(spec, activation_options)
    if cache is not None and key in cache and (cache[key]["required_flops"] or not count_flops):
        base = IterationEstimate.from_dict(cache[key])
    else:
        base = estimate_iteration(replace(spec, options=activation_options), count_flops=count_flops)
        if cache is not None:
            cache[key] = base.to_dict()
    if activation_options == options:
        return base
    adjusted = replace(spec, options=options)
    backbone = build_backbone(adjusted)
    towers = build_reward_towers(adjusted)
    decoder = build_reward_decoder(adjusted)
    persistent = _persistent_bytes(adjusted, backbone, decoder, towers)
    _, dequantized = frozen_backbone_bytes(backbone, options.quantized_base)
    phases = {name: value + dequantized for name, value in base.phases.items()}
    return IterationEstimate(
        persistent,
        phases,
        base.flops,
        base.required_flops,
        base.required_generator_flops,
        asdict(options),
        options.estimated_only,
    )


def _cache_key(spec: IterationSpec, options: MemoryOptions) -> str:
    import hashlib
    import json

    values = asdict(replace(spec, options=options))
    # Fields added after estimates were cached leave the key as it was while they keep their default.
    if values["options"]["reward_decode_tile_size"] is None:
        del values["options"]["reward_decode_tile_size"]
    if not values["options"]["sequential_reward_backward"]:
        del values["options"]["sequential_reward_backward"]
    for name in ("width", "num_frames", "reward_frames"):
        if values[name] is None:
            del values[name]
    revision = DECODE_ESTIMATE_REVISION.get(options.reward_decode)
    if revision is not None:
        values["decode_estimate_revision"] = revision
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def candidate_options(spec: IterationSpec) -> list[MemoryOptions]:
    """[`CANDIDATE_OPTIONS`] that apply to `spec`: a run without rewards has no decode or reward towers to change; an
    autoencoder without diffusers checkpointing (Qwen-Image's) or tiling this project drives gets no such candidate
    (the trainer would refuse them)."""
    if spec.options.reward_decode != "none":
        import diffusers

        from .reward_decode import TILED_REWARD_VAES

        vae_class = getattr(diffusers, spec.kind.vae_class)
        checkpointing = getattr(vae_class, "_supports_gradient_checkpointing", False)
        return [
            options
            for options in CANDIDATE_OPTIONS
            if (checkpointing or options.reward_decode != "full_checkpointed")
            and (options.reward_decode_tile_size is None or spec.kind.vae_class in TILED_REWARD_VAES)
            # Video families have no tiny image autoencoder (the family refuses one).
            and not (spec.kind.video and options.reward_decode == "tiny")
        ]
    candidates = []
    for options in CANDIDATE_OPTIONS:
        options = replace(
            options, reward_decode="none", cache_reward_text_features=False, sequential_reward_backward=False
        )
        if options not in candidates:
            candidates.append(options)
    return candidates


def choose_memory_options(
    spec: IterationSpec, max_memory_gib: float, cache: dict | None = None
) -> tuple[MemoryOptions | None, str]:
    """The cheapest of [`CANDIDATE_OPTIONS`] whose estimated total fits `max_memory_gib`, and a table of every
    candidate's estimate (`None` when none fits: the table says what each would need)."""
    rows, chosen = [], None
    for options in candidate_options(spec):
        estimate, _ = fast_estimate(replace(spec, options=options), cache if cache is not None else {})
        if estimate is None:
            estimate = options_estimate(spec, options, cache)
        fits = estimate.total_bytes <= max_memory_gib * GIB
        if fits and chosen is None:
            chosen = options
        only = f" [estimated only: {', '.join(options.estimated_only)}]" if options.estimated_only else ""
        flags = f" [{' '.join(options.flags())}]" if options.flags() else ""
        mark = "<- chosen" if chosen is options else ("fits" if fits else "")
        rows.append(f"  {estimate.total_bytes / GIB:7.2f} GiB  {options.describe()}{flags}{only} {mark}".rstrip())
        if chosen is not None:
            break
    header = f"Memory estimate per GPU (budget {max_memory_gib:g} GiB, margin included), cheapest options first:"
    return chosen, "\n".join([header, *rows])


def format_estimate(estimate: IterationEstimate) -> str:
    """A per-phase table in GiB."""
    lines = ["Memory estimate per GPU (fake tensors at real size, activations included):"]
    for name, value in estimate.persistent.items():
        lines.append(f"  {name:<48} {value / GIB:8.2f} GiB")
    for name, value in estimate.phases.items():
        lines.append(f"  peak of the {name:<36} {value / GIB:8.2f} GiB")
    lines.append(f"  {'margin (CUDA context, fragmentation)':<48} {estimate.margin_bytes / GIB:8.2f} GiB")
    lines.append(f"  {'total (peak phase: ' + estimate.peak_phase + ')':<48} {estimate.total_bytes / GIB:8.2f} GiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# A run's configuration (preflight)
# ----------------------------------------------------------------------------------------------------------------
def options_of_config(config) -> MemoryOptions:
    """The memory options a `DMDRConfig` runs with today."""
    from .rewards import parse_reward_spec

    if not config.reward:
        decode = "none"
    elif config.reward_vae_model_name_or_path:
        decode = "tiny"
    else:
        decode = "full_checkpointed" if config.reward_vae_gradient_checkpointing else "full"
    tile_size = config.reward_vae_tile_size if decode.startswith("full") else None
    # `base_quantization` arrives with the quantized-base loading (config.py); absent, the base is bf16.
    quantization = QUANTIZATION_OF_BASE.get(getattr(config, "base_quantization", "none") or "none", "none")
    return MemoryOptions(
        gradient_checkpointing=config.gradient_checkpointing,
        reward_decode=decode,
        reward_decode_tile_size=tile_size,
        cache_reward_text_features=bool(config.reward) and config.cache_reward_text_features,
        quantized_base=quantization,
        # Modelled with every reward offloaded; sequential backward with towers on the device is estimated (an
        # over-estimate) as the joint backward.
        sequential_reward_backward=bool(config.reward)
        and getattr(config, "sequential_reward_backward", False)
        and all(parse_reward_spec(spec).options.get("offload", False) for spec in config.reward),
    )


def spec_from_config(config, family) -> IterationSpec:
    """The iteration of a `DMDRConfig` run: the teacher's own backbone and VAE configs (read, no weights), the run's
    resolution, per-process batch, steps, LoRA shapes, optimizer and options. Each reward is taken as a CLIP ViT-H/14
    pair of towers (the shape of the built-in `clip` and `hpsv2.1` rewards)."""
    from .families.base import read_component_config, read_vae_config

    if config.training_mode != "lora":
        raise ValueError("--max_memory_gib estimates LoRA runs (the recipes' mode); drop it for --training_mode full.")
    if family.name not in BACKBONE_KINDS:
        raise ValueError(
            f"--max_memory_gib has no estimate for {family.name} teachers yet (known: {sorted(BACKBONE_KINDS)})."
        )
    source, revision = config.pretrained_model_name_or_path, config.revision
    targets = config.lora_target_modules.split(",") if config.lora_target_modules else None
    # The VAE that decodes: `--pretrained_vae_model_name_or_path` when given (same class and latent space).
    vae_path = getattr(config, "pretrained_vae_model_name_or_path", None)
    vae_config = _init_config(
        read_vae_config(vae_path, revision) if vae_path else read_component_config(source, "vae", revision)
    )
    if family.name == "wan" and vae_config.get("scale_factor_spatial", 8) != 8:
        raise ValueError("--max_memory_gib estimates Wan 2.1 clips (8x spatial VAE); Wan 2.2's is not modelled yet.")
    return IterationSpec(
        family=family.name,
        backbone_config=_init_config(read_component_config(source, family.backbone_name, revision)),
        vae_config=vae_config,
        resolution=config.resolution,
        width=config.image_size[1] if config.image_size[1] != config.resolution else None,
        num_frames=family.num_frames_of(config) if family.is_video else None,
        reward_frames=tuple(config.reward_frames) if family.is_video and config.reward_frames else None,
        batch_size=config.train_batch_size,
        num_student_steps=config.num_student_steps,
        update_ratio=config.update_ratio,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        fake_lora_rank=config.fake_lora_rank,
        fake_lora_alpha=config.fake_lora_alpha if config.fake_lora_alpha is not None else config.fake_lora_rank,
        lora_target_modules=tuple(targets) if targets else None,
        fake_score_lora_scale=config.fake_score_lora_scale,
        real_score_lora_scale=config.real_score_lora_scale,
        use_8bit_adam=config.use_8bit_adam,
        num_rewards=len(config.reward),
        options=options_of_config(config),
    )


def _init_config(config: dict) -> dict:
    # `config.json` carries bookkeeping keys (`_class_name`, `_diffusers_version`, ...) that are not model arguments.
    return {key: value for key, value in config.items() if not key.startswith("_")}


def estimate_cache_path():
    """Where estimates are kept between runs, keyed by configuration: `$XDG_CACHE_HOME/diffusers_dmdr/
    memory_estimates.json` (`~/.cache` by default). A real-size estimate takes minutes on one core; a cached one is
    read in milliseconds and is exactly the full estimate."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "diffusers_dmdr" / "memory_estimates.json"


# ----------------------------------------------------------------------------------------------------------------
# Fast estimates for the preflight: the cache, the published table, or a full run of a small model
# ----------------------------------------------------------------------------------------------------------------
# The published recipes' activation peaks (`benchmarks/iteration_memory.py` writes this file from its results): per
# backbone class and frozen parameter count, autoencoder parameter count and activation options, the phase peaks of
# one iteration at 1024 px, batch 1, two ViT-H/14 rewards.
PUBLISHED_ESTIMATES_FILE = "published_estimates.json"
PUBLISHED_PIXELS = 1024 * 1024
# Backbones under this many parameters are estimated in full by the preflight (seconds); larger ones take 1-5 min.
FULL_ESTIMATE_MAX_PARAMETERS = 100_000_000


def run_pixels(spec: IterationSpec) -> int:
    """Pixels one sample of the run decodes: height x width (x frames for a clip)."""
    return spec.resolution * (spec.width or spec.resolution) * (spec.num_frames or 1)


def published_estimates() -> dict:
    import json
    from pathlib import Path

    path = Path(__file__).with_name(PUBLISHED_ESTIMATES_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def architecture_key(spec: IterationSpec, backbone: torch.nn.Module, decoder: torch.nn.Module | None) -> str:
    """What the published table is keyed by: the backbone class and parameter count, the reward decoder's parameter
    count, the number of rewards and the activation options (quantization and text caching change persistent
    bytes only)."""
    backbone_parameters = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    decoder_parameters = sum(p.numel() for p in decoder.parameters()) if decoder is not None else 0
    options = _activation_options(spec.options)
    return (
        f"{spec.kind.model_class}:{backbone_parameters}|decoder:{decoder_parameters}|rewards:{spec.num_rewards}"
        f"|{options.describe()}"
    )


def scaled_estimate(spec: IterationSpec, table: dict | None = None) -> IterationEstimate | None:
    """The estimate of `spec` from the published table, or `None` when its architecture and options are not there:
    persistent bytes exact (meta models, seconds), activation peaks of the published recipe (1024 px or its clip,
    batch 1) scaled by `batch * pixels / published pixels` when that is above 1 and kept as they are below it. Part of each peak
    does not grow with the pixels (the reward towers see 224 px; the conditioning), so the linear scaling
    over-estimates a larger run and would under-estimate a smaller one: never scaling down keeps it an upper bound
    (`benchmarks/iteration_memory.py --fit-check` measures its distance from full estimates)."""
    table = published_estimates() if table is None else table
    # The key needs the frozen parameter count only: the bare meta backbone, without the (slow to inject) adapters.
    bare_backbone = _meta("diffusers", spec.kind.model_class, spec.backbone_config, torch.bfloat16)
    decoder = build_reward_decoder(spec)
    entry = table.get(architecture_key(spec, bare_backbone, decoder))
    if entry is None:
        return None
    backbone = build_backbone(spec)
    scale = max(1.0, spec.batch_size * run_pixels(spec) / entry.get("pixels", PUBLISHED_PIXELS))
    _, dequantized = frozen_backbone_bytes(backbone, spec.options.quantized_base)
    phases = {name: int(value * scale) + dequantized for name, value in entry["phases"].items()}
    persistent = _persistent_bytes(spec, backbone, decoder, build_reward_towers(spec))
    options = spec.options
    return IterationEstimate(persistent, phases, {}, 0, 0, asdict(options), options.estimated_only)


def fast_estimate(spec: IterationSpec, cache: dict, allow_full: bool = True) -> tuple[IterationEstimate | None, str]:
    """The preflight's estimate of `spec`, without a minutes-long fake run of a large model: the cached full estimate
    of this exact configuration; else the published table scaled to the run's pixels and batch; else, with
    `allow_full`, a full estimate when the backbone is small (seconds). `(None, why)` when none applies. The string
    says which was used."""
    activation_options = _activation_options(spec.options)
    if _cache_key(spec, activation_options) in cache:
        return options_estimate(spec, spec.options, cache), "full estimate of this configuration, cached"
    scaled = scaled_estimate(spec)
    if scaled is not None:
        return scaled, "the published recipe's activations scaled to this run's pixels and batch"
    if allow_full and sum(p.numel() for p in build_backbone(spec).parameters()) <= FULL_ESTIMATE_MAX_PARAMETERS:
        return options_estimate(spec, spec.options, cache), "full estimate of this configuration"
    return None, (
        "activations not estimated: no cached or published estimate of this backbone and options "
        "(--max_memory_gib N runs the full estimate once, 1-5 min at real size, and caches it)"
    )


def _load_cache(path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _save_cache(path, cache: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache))


def describe_run_estimate(config, family, cache_path=None) -> str:
    """Preflight without `--max_memory_gib`: the estimate of the run as configured, activations included, in seconds
    ([`fast_estimate`] without a fake run: the cache or the published table), or one line saying why there is none
    (a full-mode run, a family or backbone without an estimate)."""
    from pathlib import Path

    try:
        spec = spec_from_config(config, family)
    except (ValueError, OSError) as error:
        return f"Memory estimate: none for this run ({str(error).replace('--max_memory_gib', 'the estimator')})"
    path = Path(cache_path) if cache_path is not None else estimate_cache_path()
    try:
        estimate, source = fast_estimate(spec, _load_cache(path), allow_full=False)
    except Exception as error:  # an informational print: a config the meta build rejects must not stop the run here
        return f"Memory estimate: none for this run (its configs do not build on the meta device: {error})"
    if estimate is None:
        # The memory plan the preflight also prints has the exact persistent bytes.
        return f"Memory estimate per GPU, activations included: none yet; {source}."
    return format_estimate(estimate) + f"\n  ({source}; options: {spec.options.describe()})"


def check_memory_budget(config, family, cache_path=None) -> str:
    """Preflight for `--max_memory_gib`: estimate the run as configured (before any weight loads); return the report
    when it fits, else raise `ValueError` in one line naming the cheapest candidate options that would fit and the
    estimate of each candidate tried. The configuration is never changed behind the user's back."""
    from pathlib import Path

    path = Path(cache_path) if cache_path is not None else estimate_cache_path()
    cache = _load_cache(path)
    size = len(cache)
    spec = spec_from_config(config, family)
    budget = config.max_memory_gib
    try:
        estimate, source = fast_estimate(spec, cache)
        if estimate is None:
            estimate, source = options_estimate(spec, spec.options, cache), "full estimate of this configuration"
        if estimate.total_bytes <= budget * GIB:
            return format_estimate(estimate) + f"\n  fits --max_memory_gib {budget:g} ({source})"
        chosen, table = choose_memory_options(spec, budget, cache)
    finally:
        if len(cache) != size:
            _save_cache(path, cache)
    tried = "; ".join(line.strip() for line in table.splitlines()[1:])
    current = f"--max_memory_gib {budget:g}: this run needs an estimated {estimate.total_bytes / GIB:.1f} GiB per GPU"
    if chosen is None:
        raise ValueError(f"{current}, and no option this project can estimate fits ({tried}).")
    raise ValueError(
        f"{current}; the cheapest options that fit are {chosen.describe()}: set {' '.join(chosen.flags())} ({tried})."
    )
