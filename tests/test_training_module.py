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


def test_shipped_accelerate_configs_load_and_fsdp2_wraps_the_backbone_blocks(monkeypatch):
    """accelerate, given the shipped fsdp2.yaml, makes every block the backbone lists in `_no_split_modules` an FSDP2
    unit (tests/test_fsdp.py runs the same file through accelerate's `prepare`). No DeepSpeed config is shipped: see
    tests/test_engines.py."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up

    from diffusers_dmdr.training_module import DMDRTrainingModule

    folder = Path(__file__).parents[1] / "examples" / "train_dmdr" / "accelerate_configs"
    types = {path.stem: str(load_config_from_file(str(path)).distributed_type) for path in folder.glob("*.yaml")}
    assert types == {
        "single_gpu": "DistributedType.NO",
        "multi_gpu_ddp": "DistributedType.MULTI_GPU",
        "fsdp2": "DistributedType.FSDP",
        "two_nodes_fsdp2_node0": "DistributedType.FSDP",
        "two_nodes_fsdp2_node1": "DistributedType.FSDP",
    }
    assert not list(folder.glob("*deepspeed*"))
    fsdp_config = load_config_from_file(str(folder / "fsdp2.yaml")).fsdp_config
    assert fsdp_config["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in fsdp_config
    # The two-node files shard as fsdp2.yaml does, over 2 machines, one with each rank.
    for rank in (0, 1):
        node = load_config_from_file(str(folder / f"two_nodes_fsdp2_node{rank}.yaml"))
        assert node.fsdp_config == fsdp_config and node.mixed_precision == "bf16"
        assert (node.num_machines, node.machine_rank, node.num_processes) == (2, rank, 16)

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=fsdp_config["fsdp_auto_wrap_policy"])
    module = DMDRTrainingModule(tiny_backbone(), call_backbone=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    accelerate_units = {id(m) for m in get_module_children_bottom_up(module)[:-1] if policy(m)}
    blocks = set(module._no_split_modules)
    expected = {id(m) for m in module.modules() if m is not module and type(m).__name__ in blocks}
    assert accelerate_units and accelerate_units == expected
