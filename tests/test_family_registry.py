"""The family registry: every family's facts, read from its class, agree with diffusers and with the pipeline file.

`pipelines/pipeline_dmdr.py` ships standalone in exports, so it states each family's stock route again; these tests
tie the two, and tie the facts to the stock pipelines they describe.
"""

import inspect

import diffusers
import pytest

from diffusers_dmdr.families import FAMILIES, FAMILY_BY_PIPELINE, get_family
from diffusers_dmdr.families.base import GRID_RULES
from diffusers_dmdr.lora_formats import COMFY_LORA_FORMS, TRANSFORMER_STYLE, UNET_STYLE
from diffusers_dmdr.pipelines.pipeline_dmdr import STOCK_ROUTES


def stock_call_default(pipeline_class_name: str, argument: str):
    return inspect.signature(getattr(diffusers, pipeline_class_name).__call__).parameters[argument].default


def test_the_registry_and_the_pipeline_file_name_the_same_families():
    assert {name: get_family(name).name for name in FAMILIES} == {name: name for name in FAMILIES}
    assert set(FAMILY_BY_PIPELINE) == set(STOCK_ROUTES)
    assert {cls: route.family for cls, route in STOCK_ROUTES.items()} == FAMILY_BY_PIPELINE


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_facts_agree_with_diffusers_and_the_stock_route(name):
    family = get_family(name)
    route = family.stock_route
    pipeline_class = getattr(diffusers, family.pipeline_class_name)
    # The stock route's classes exist in diffusers, and the backbone is a component of the stock pipeline.
    assert route.backbone == family.backbone_name
    assert family.backbone_name in inspect.signature(pipeline_class.__init__).parameters
    for class_name in (family.backbone_class_name, route.vae_class):
        assert isinstance(getattr(diffusers, class_name), type), class_name
    assert isinstance(getattr(diffusers, family.pipeline_class_name), type)
    # Card tags, LoRA key form, grid rule.
    assert family.card_tags and all(isinstance(tag, str) and tag for tag in family.card_tags)
    assert family.comfy_lora_style in COMFY_LORA_FORMS
    assert family.comfy_lora_style == (UNET_STYLE if family.backbone_name == "unet" else TRANSFORMER_STYLE)
    assert family.grid_rule in GRID_RULES
    assert (family.grid_rule == "ddpm-trailing") == (not family.is_flow)
    assert family.grid_uses_teacher_scheduler == (family.grid_rule == "teacher-scheduler")
    # The prompt length the trainer encodes with is the one the exported pipeline passes.
    if "max_sequence_length" in route.call_defaults:
        assert route.call_defaults["max_sequence_length"] == family.max_prompt_tokens
    if family.max_prompt_tokens is not None and name != "sd3":
        assert family.max_prompt_tokens == stock_call_default(family.pipeline_class_name, "max_sequence_length")
    # Guidance-distilled teachers sample at the stock pipeline's default embedding, which the route passes.
    if family.default_guidance_embedding is not None:
        assert route.call_defaults["guidance_scale"] == family.default_guidance_embedding
        assert family.default_guidance_embedding == stock_call_default(family.pipeline_class_name, "guidance_scale")
    # Non-square training is wired through the UNet families' size conditioning only.
    assert family.supports_non_square == (family.backbone_name == "unet")


def test_the_registry_holds_the_constants_once():
    """SD3's 128 T5 tokens (the released scripts, not the stock 256) and FLUX.1's 3.5 embedding, from the registry."""
    assert get_family("sd3").max_prompt_tokens == 128
    assert stock_call_default("StableDiffusion3Pipeline", "max_sequence_length") == 256
    assert get_family("flux").default_guidance_embedding == 3.5
    assert [get_family(name).default_guidance_embedding for name in FAMILIES if name != "flux"] == [None] * 6
    assert len({get_family(name).card_tags for name in FAMILIES}) == len(FAMILIES)
