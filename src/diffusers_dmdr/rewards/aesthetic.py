"""LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding, predicting a
1-10 rating (the "Aesthetic" column of DMDR's tables, as TRL's DDPO example computes it)."""

import re

import torch
import torch.nn.functional as F
from torch import nn

from .preprocessing import ImagePreprocessing
from .weights import (
    RewardLoadError,
    from_pretrained_or_raise,
    image_processor_dict,
    load_pretrained_model,
    load_state_dict_file,
    resolve_weight_file,
)


_HEAD_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def aesthetic_head_from_state_dict(state_dict: dict[str, torch.Tensor]) -> nn.Sequential:
    r"""The MLP of the improved aesthetic predictor, shaped from its checkpoint and loaded strictly.

    The published head is `Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
    Linear(64, 16), Linear(16, 1)` stored as `layers.{0,2,4,6,7}`; the dropouts are identities at inference.
    Widths and depth are read from the tensors, so smaller heads (tests) load the same way.
    """
    linear_indices = sorted({int(match.group(1)) for key in state_dict if (match := _HEAD_KEY.match(key))})
    if not linear_indices or len(linear_indices) * 2 != len(state_dict):
        raise RewardLoadError(
            f"Not an aesthetic predictor head: expected only 'layers.N.weight/bias' keys, got {sorted(state_dict)[:6]}."
        )
    layers = [nn.Identity() for _ in range(linear_indices[-1] + 1)]
    for index in linear_indices:
        out_features, in_features = state_dict[f"layers.{index}.weight"].shape
        layers[index] = nn.Linear(in_features, out_features)
    head = nn.Sequential(*layers)
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state_dict.items()}, strict=True)
    return head


class AestheticReward(nn.Module):
    r"""LAION improved aesthetic score of an image (the prompt is ignored), about 1-10.

    Args:
        model (`str`, defaults to `"trl-lib/ddpo-aesthetic-predictor"`):
            The MLP head: a `.pth`/`.safetensors` file, a folder holding `filename`, or a Hub id.
        filename (`str`, defaults to `"aesthetic-model.pth"`): the head's file inside the folder or repository.
        clip_model (`str`, defaults to `"openai/clip-vit-large-patch14"`):
            The CLIP model whose image embedding the head was trained on; only its vision tower is loaded.
    """

    # Scores of 1-10 sit above the 0.7 hinge, which would make the loss zero: linear by default.
    default_hinge = None
    path_options = ("model", "clip_model")

    def __init__(
        self,
        model: str = "trl-lib/ddpo-aesthetic-predictor",
        filename: str = "aesthetic-model.pth",
        clip_model: str = "openai/clip-vit-large-patch14",
    ):
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        self.head = aesthetic_head_from_state_dict(load_state_dict_file(resolve_weight_file(model, filename)))
        # Only the vision tower and its projection load (the text tower is a third of CLIP-L's weights); the
        # projection width lives in the full CLIPConfig, not in its vision part.
        config = from_pretrained_or_raise(AutoConfig.from_pretrained, clip_model, "aesthetic predictor's CLIP config")
        vision_config = getattr(config, "vision_config", config)
        vision_config.projection_dim = config.projection_dim
        self.vision_model = load_pretrained_model(
            CLIPVisionModelWithProjection, clip_model, "aesthetic predictor's CLIP vision tower", config=vision_config
        )
        if self.vision_model.config.projection_dim != self.head[0].in_features:
            raise RewardLoadError(
                f"The aesthetic head takes {self.head[0].in_features}-d embeddings but {clip_model!r} gives "
                f"{self.vision_model.config.projection_dim}-d ones."
            )
        self.preprocessing = ImagePreprocessing.from_image_processor_dict(
            image_processor_dict(clip_model), default_size=self.vision_model.config.image_size
        )

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Predicted rating `(B,)` of images `(B, 3, H, W)` in [0, 1]; `prompts` are not used."""
        model_dtype = self.vision_model.visual_projection.weight.dtype
        pixel_values = self.preprocessing(images).to(model_dtype)
        image_embeds = F.normalize(self.vision_model(pixel_values=pixel_values).image_embeds.float(), dim=-1)
        head_dtype = self.head[0].weight.dtype
        return self.head(image_embeds.to(head_dtype)).squeeze(-1).float()
