"""The adapter routing of the one training module, checked against PEFT's own public API."""

import torch

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER, AdapterRouter, build_training_backbones
from diffusers_dmdr.testing import tiny_sdxl_unet


def tiny_backbone():
    lora = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_v"]}
    backbone, _ = build_training_backbones(tiny_sdxl_unet(), "lora", torch.float32, lora, lora)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return backbone


def unet_inputs(backbone):
    generator = torch.Generator().manual_seed(0)
    config = backbone.config
    sample = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 4, config.cross_attention_dim, generator=generator)
    added = {
        "text_embeds": torch.randn(2, 32, generator=generator),
        "time_ids": torch.randn(2, 6, generator=generator),
    }
    return (sample, torch.tensor([500, 100]), text), {"added_cond_kwargs": added, "return_dict": False}


def test_routing_matches_peft_public_api_and_keeps_requires_grad():
    """`AdapterRouter` sets PEFT layer state directly (to leave `requires_grad` alone): if PEFT renames that state,
    these outputs stop matching the ones routed through PEFT's public methods."""
    backbone = tiny_backbone()
    args, kwargs = unet_inputs(backbone)
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    router = AdapterRouter(backbone)
    outputs = {}
    with torch.no_grad():
        for adapter, scale in ((STUDENT_ADAPTER, 1.0), (FAKE_ADAPTER, 2.0), (None, 1.0), (FAKE_ADAPTER, 0.0)):
            router.route(adapter, scale)
            outputs[adapter, scale] = backbone(*args, **kwargs)[0]
            assert {name for name, p in backbone.named_parameters() if p.requires_grad} == trainable
            for layer in router.layers:
                assert layer.disable_adapters == (adapter is None or scale == 0)
                if adapter is not None and scale != 0:
                    assert layer.active_adapters == [adapter]
        # The same routes through PEFT's public API (which also flips requires_grad, hence not used in training).
        backbone.enable_adapters()
        backbone.set_adapters([STUDENT_ADAPTER], [1.0])
        torch.testing.assert_close(outputs[STUDENT_ADAPTER, 1.0], backbone(*args, **kwargs)[0], rtol=0, atol=0)
        backbone.set_adapters([FAKE_ADAPTER], [2.0])
        torch.testing.assert_close(outputs[FAKE_ADAPTER, 2.0], backbone(*args, **kwargs)[0], rtol=0, atol=0)
        backbone.disable_adapters()
        base = backbone(*args, **kwargs)[0]
    assert torch.equal(outputs[None, 1.0], base) and torch.equal(outputs[FAKE_ADAPTER, 0.0], base)
    assert not torch.allclose(outputs[STUDENT_ADAPTER, 1.0], base) and not torch.allclose(
        outputs[FAKE_ADAPTER, 2.0], base
    )
