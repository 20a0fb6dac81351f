"""The ComfyUI / kohya-format LoRA conversion as a pure function: every module mapped, the strength preserved."""

import pytest
import torch

from diffusers_dmdr.lora_formats import COMFY_LORA_FORMS, lora_scale, peft_to_comfy_lora


def peft_lora(modules: dict[str, tuple[int, ...]], rank: int, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """A random PEFT-format LoRA: per module path, the shape of the base weight (linear `(out, in)` or conv)."""
    state = {}
    for module, (out_features, in_features, *kernel) in modules.items():
        state[f"{prefix}.{module}.lora_A.weight"] = torch.randn(rank, in_features, *kernel)
        state[f"{prefix}.{module}.lora_B.weight"] = torch.randn(out_features, rank, *([1] * len(kernel)))
    return state


def delta_weights(state: dict[str, torch.Tensor], down: str, up: str, scale_of) -> dict[str, torch.Tensor]:
    """Per module, the weight change a reader applies: `scale * up @ down` (conv factors flattened)."""
    deltas = {}
    for key, down_weight in state.items():
        if key.endswith(down):
            module = key.removesuffix(down)
            up_weight = state[module + up]
            product = up_weight.flatten(1) @ down_weight.flatten(1)
            deltas[module] = scale_of(module, down_weight.shape[0]) * product
    return deltas


MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
    "down_blocks.0.resnets.0.conv1": (8, 4, 3, 3),
    "down_blocks.0.resnets.0.time_emb_proj": (8, 16),
    "up_blocks.1.upsamplers.0.conv": (8, 8, 3, 3),
}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_unet_style_keeps_every_module_and_its_strength(use_rslora):
    rank, alpha = 4, 8.0
    config = {"r": rank, "lora_alpha": alpha, "use_rslora": use_rslora}
    peft = peft_lora(MODULES, rank)
    comfy = peft_to_comfy_lora(peft, config, "lora_unet", prefix="unet")
    # Three tensors per module, no module dropped or merged.
    assert len(comfy) == 3 * len(MODULES) == 3 * len(peft) // 2
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in comfy
    alphas = {key.removesuffix(".alpha"): value for key, value in comfy.items() if key.endswith(".alpha")}
    assert all(value.dtype == torch.float32 and value.ndim == 0 for value in alphas.values())
    expected_alpha = alpha * rank**0.5 if use_rslora else alpha
    assert all(value.item() == pytest.approx(expected_alpha) for value in alphas.values())
    # The weight change a kohya reader applies (alpha / rank * up @ down) is PEFT's (scale * B @ A).
    peft_deltas = delta_weights(peft, ".lora_A.weight", ".lora_B.weight", lambda m, r: lora_scale(config))
    comfy_deltas = delta_weights(comfy, ".lora_down.weight", ".lora_up.weight", lambda m, r: alphas[m].item() / r)
    for module, delta in peft_deltas.items():
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        torch.testing.assert_close(comfy_deltas[name], delta)


def test_transformer_style_folds_the_scale_and_writes_no_alpha():
    rank, alpha = 4, 2.0
    modules = {"transformer_blocks.0.attn.to_q": (8, 8), "transformer_blocks.0.attn.add_k_proj": (8, 6)}
    peft = peft_lora(modules, rank, prefix="transformer")
    comfy = peft_to_comfy_lora(peft, {"r": rank, "lora_alpha": alpha}, "transformer", prefix="transformer")
    assert sorted(comfy) == sorted(
        f"transformer.{module}.lora_{part}.weight" for module in modules for part in ("A", "B")
    )
    # A missing alpha means scale 1 to the readers: the trained scale alpha / rank is inside lora_up.
    peft_deltas = delta_weights(peft, ".lora_A.weight", ".lora_B.weight", lambda m, r: alpha / rank)
    comfy_deltas = delta_weights(comfy, ".lora_A.weight", ".lora_B.weight", lambda m, r: 1.0)
    assert peft_deltas.keys() == comfy_deltas.keys()
    for module, delta in peft_deltas.items():
        torch.testing.assert_close(comfy_deltas[module], delta)
    # The input is left as it was.
    assert all(not torch.equal(comfy[key], peft[key]) for key in peft if key.endswith("lora_B.weight"))


def test_bad_input_is_refused_with_the_reason():
    peft = peft_lora({"a.to_q": (4, 4)}, 2)
    with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
        peft_to_comfy_lora(
            {**peft, "unet.a.to_q.base_layer.weight": torch.zeros(4, 4)}, {"r": 2, "lora_alpha": 2}, "lora_unet"
        )
    with pytest.raises(ValueError, match="without both lora_A and lora_B"):
        peft_to_comfy_lora({"unet.a.to_q.lora_A.weight": torch.zeros(2, 4)}, {"r": 2, "lora_alpha": 2}, "lora_unet")
    with pytest.raises(ValueError, match="rank_pattern"):
        peft_to_comfy_lora(peft, {"r": 2, "lora_alpha": 2, "rank_pattern": {"to_q": 4}}, "lora_unet")
    with pytest.raises(ValueError, match="Unknown ComfyUI LoRA style"):
        peft_to_comfy_lora(peft, {"r": 2, "lora_alpha": 2}, "kohya")


def test_every_family_has_a_comfy_lora_style():
    """A new family must say which key form its ComfyUI file uses (its `comfy_lora_style`)."""
    from diffusers_dmdr.families import FAMILIES, get_family

    assert {name: get_family(name).comfy_lora_style in COMFY_LORA_FORMS for name in FAMILIES} == dict.fromkeys(
        FAMILIES, True
    )
