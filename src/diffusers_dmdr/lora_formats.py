"""The student LoRA in the key format ComfyUI, Forge and Automatic1111 read (the "kohya" format), as a pure function.

The diffusers file (`pytorch_lora_weights.safetensors`) keeps PEFT keys (`unet.<module>.lora_A.weight`) and the LoRA
alpha only in its JSON metadata. Other tools read neither the metadata nor every PEFT key, so they apply the wrong
strength (alpha / rank) and, for the UNet families, drop modules. The file written here follows each tool's own key
map, read from their source:

- **UNet families (SDXL, SD1.5)**: `lora_unet_<module path, "." -> "_">.lora_down.weight` (PEFT's `lora_A`),
  `.lora_up.weight` (`lora_B`) and `.alpha` (a float32 scalar tensor holding `lora_alpha`). ComfyUI's
  `comfy/lora.py:model_lora_keys_unet` maps `lora_unet_` + every diffusers UNet weight path with `_` for `.`
  (through `comfy.utils.unet_to_diffusers`), and its `load_lora` reads `lora_up`/`lora_down`/`alpha` and applies
  `alpha / rank`; diffusers reads the same file with `_convert_non_diffusers_lora_to_diffusers` and
  `_convert_unet_lora_key` (`diffusers/loaders/lora_conversion_utils.py`), turning `.alpha` into `network_alphas`.
- **Transformer families (SD3)**: `transformer.<module path>.lora_A.weight` / `.lora_B.weight` (diffusers' names),
  with the scale `alpha / rank` folded into `lora_B` and no `.alpha` tensor. ComfyUI maps `transformer.<diffusers
  path>` for SD3 (`model_lora_keys_unet`, "regular diffusers sd3 lora format", through `comfy.utils.mmdit_to_diffusers`),
  reads `lora_A`/`lora_B` (`load_lora`'s "diffusers2" form) and treats a missing alpha as scale 1. diffusers'
  `SD3LoraLoaderMixin.lora_state_dict` has no non-diffusers converter: `load_lora_weights` refuses a key without `lora`
  in it (an `.alpha` tensor) and `load_lora_adapter` does not rename `lora_down`/`lora_up` for this model. Folding the
  scale is the one form both load at the trained strength without the diffusers file's JSON metadata.

Both forms hold every module of the PEFT state dict (a test checks the count and that loading it back through
diffusers gives the PEFT file's output).
"""

import math
import re

import torch


KOHYA_LORA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
# The key forms of a ComfyUI-format file (see the module docstring); each family names its own
# (`ModelFamily.comfy_lora_style`).
UNET_STYLE, TRANSFORMER_STYLE = "lora_unet", "transformer"
COMFY_LORA_FORMS = (UNET_STYLE, TRANSFORMER_STYLE)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


def lora_scale(lora_config: dict) -> float:
    r"""The factor PEFT multiplies `lora_B @ lora_A` by: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`."""
    rank, alpha = lora_config["r"], lora_config["lora_alpha"]
    return alpha / math.sqrt(rank) if lora_config.get("use_rslora") else alpha / rank


def peft_to_comfy_lora(
    peft_state_dict: dict[str, torch.Tensor], lora_config: dict, style: str, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    r"""Convert a PEFT-format LoRA state dict to the ComfyUI / kohya key format, losing no module.

    For a module with PEFT weights $A$ (`lora_A`, rank $r$ rows) and $B$ (`lora_B`), PEFT adds
    $\Delta W = s\,B A$ with $s$ = [`lora_scale`]. Kohya-format readers add $\Delta W = (\alpha_k / r)\,U D$ with
    $D$ = `lora_down`, $U$ = `lora_up` and $\alpha_k$ = the `.alpha` tensor (scale 1 when absent). So:

    - `style="lora_unet"`: $D = A$, $U = B$, $\alpha_k = s\,r$ (= `lora_alpha` without rsLoRA);
    - `style="transformer"`: keys `lora_A` ($= A$) and `lora_B` ($= s\,B$), no `.alpha`.

    Args:
        peft_state_dict (`dict[str, torch.Tensor]`):
            `<module path>.lora_A.weight` / `.lora_B.weight` tensors; the keys may carry the backbone's prefix
            (`unet.`, `transformer.`), which is removed first when `prefix` is given.
        lora_config (`dict`):
            The `LoraConfig` as a dict (`r`, `lora_alpha`, optionally `use_rslora`); per-module `rank_pattern` or
            `alpha_pattern` are refused (the student LoRA has one rank and alpha).
        style (`str`):
            `"lora_unet"` or `"transformer"` (the family's `comfy_lora_style`).
        prefix (`str`, *optional*):
            The backbone's name (`unet`, `transformer`) the PEFT keys may start with.

    Returns:
        `dict[str, torch.Tensor]`: the converted state dict (new tensors; the input is not modified).

    Raises:
        `ValueError`: a key that is not a LoRA A/B weight, a module missing its A or B, per-module patterns, or an
        unknown style.
    """
    if style not in (UNET_STYLE, TRANSFORMER_STYLE):
        raise ValueError(f"Unknown ComfyUI LoRA style {style!r}; expected {UNET_STYLE!r} or {TRANSFORMER_STYLE!r}.")
    if lora_config.get("rank_pattern") or lora_config.get("alpha_pattern"):
        raise ValueError("Per-module LoRA ranks or alphas (rank_pattern / alpha_pattern) are not supported here.")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        if prefix is not None:
            key = key.removeprefix(f"{prefix}.")
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a PEFT LoRA weight (`<module>.lora_A.weight` / `.lora_B.weight`).")
        modules.setdefault(match["module"], {})[match["part"]] = tensor
    incomplete = sorted(module for module, parts in modules.items() if set(parts) != {"A", "B"})
    if incomplete:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {incomplete[:3]}.")
    scale = lora_scale(lora_config)
    converted = {}
    for module, parts in modules.items():
        down, up = parts["A"], parts["B"]
        if style == UNET_STYLE:
            name = "lora_unet_" + module.replace(".", "_")
            converted[f"{name}.lora_down.weight"] = down.detach().clone().contiguous()
            converted[f"{name}.lora_up.weight"] = up.detach().clone().contiguous()
            converted[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
        else:
            name = f"transformer.{module}"
            converted[f"{name}.lora_A.weight"] = down.detach().clone().contiguous()
            converted[f"{name}.lora_B.weight"] = (up.detach().float() * scale).to(up.dtype).contiguous()
    return converted
