"""Differentiable image preprocessing for reward models: tensor ops only, so the graph reaches the generator.

Reward models ship a numpy/PIL preprocessing path (a transformers image processor or an open_clip transform) that
cuts the autograd graph. `ImagePreprocessing` re-implements its inference branch on tensors in [0, 1]: antialiased
resize (what PIL does on downscale), centre crop with the reference library's own offset rounding, then
normalisation with the model's mean and std. Numerically it matches the reference path to within uint8 rounding
(tests state the tolerance).
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

# transformers' defaults for CLIP models whose folder has no `preprocessor_config.json`.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet statistics, the default of most image classifiers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes used in transformers' image processor configs.
_PIL_RESAMPLE_TO_MODE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocessing:
    r"""Tensor version of a reward model's inference preprocessing.

    Args:
        size (`int` or `tuple[int, int]`):
            An `int` resizes the shortest edge to `size` keeping the aspect ratio (`resize_mode="shortest"`); a
            `(height, width)` tuple resizes to exactly that shape (`resize_mode="squash"`).
        crop_size (`tuple[int, int]`, *optional*):
            `(height, width)` of the centre crop after resizing; `None` skips the crop.
        mean (`tuple[float, float, float]`): per-channel mean subtracted after resizing, in [0, 1] units.
        std (`tuple[float, float, float]`): per-channel standard deviation.
        interpolation (`str`, defaults to `"bicubic"`): `"bicubic"` or `"bilinear"`, always antialiased.
        crop_offset_rounding (`str`, defaults to `"floor"`):
            How the crop offset `(size - crop) / 2` is rounded: `"floor"` as transformers does, `"round"` as
            torchvision's `CenterCrop` (open_clip) does. They differ by one pixel on odd margins.
        clamp_resized (`bool`, defaults to `False`):
            Clamp the resized image to [0, 1] as PIL does at inference. Off for training, as in the released DMDR
            code: the clamp zeroes the gradient at every pixel where the bicubic kernel overshoots.
    """

    size: int | tuple[int, int]
    crop_size: tuple[int, int] | None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    crop_offset_rounding: str = "floor"
    clamp_resized: bool = False

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}.")
        if self.crop_offset_rounding not in ("floor", "round"):
            raise ValueError(f"crop_offset_rounding must be 'floor' or 'round', got {self.crop_offset_rounding!r}.")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape after the resize step, with the reference libraries' `int()` truncation of the long edge."""
        if not isinstance(self.size, int):
            return tuple(self.size)
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        r"""Turn decoded images into a reward model's pixel values, keeping the autograd graph.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): RGB images in [0, 1], any float dtype.

        Returns:
            `torch.Tensor` of shape `(B, 3, h, w)` in float32: resized, cropped and normalised pixel values.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Rewards take RGB images of shape (B, 3, H, W); got {tuple(images.shape)}.")
        # Resampling in float32: bf16 bicubic weights would add more error than the reference's uint8 rounding.
        pixel_values = images.float()
        target_shape = self.resized_shape(*pixel_values.shape[-2:])
        if target_shape != tuple(pixel_values.shape[-2:]):
            pixel_values = F.interpolate(
                pixel_values, size=target_shape, mode=self.interpolation, align_corners=False, antialias=True
            )
            if self.clamp_resized:
                pixel_values = pixel_values.clamp(0.0, 1.0)
        if self.crop_size is not None:
            pixel_values = self._center_crop(pixel_values)
        mean = pixel_values.new_tensor(self.mean).view(1, 3, 1, 1)
        std = pixel_values.new_tensor(self.std).view(1, 3, 1, 1)
        return (pixel_values - mean) / std

    def _center_crop(self, pixel_values: torch.Tensor) -> torch.Tensor:
        crop_height, crop_width = self.crop_size
        height, width = pixel_values.shape[-2:]
        if crop_height > height or crop_width > width:
            raise ValueError(
                f"Centre crop {self.crop_size} is larger than the resized image {(height, width)}; padding is not "
                "supported by the differentiable preprocessing."
            )
        if self.crop_offset_rounding == "floor":
            top, left = (height - crop_height) // 2, (width - crop_width) // 2
        else:
            top, left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
        return pixel_values[..., top : top + crop_height, left : left + crop_width]

    @classmethod
    def from_image_processor_dict(
        cls,
        processor_dict: dict,
        default_size: int = 224,
        default_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        default_std: tuple[float, float, float] = OPENAI_CLIP_STD,
    ) -> "ImagePreprocessing":
        r"""Build from a transformers `preprocessor_config.json` dictionary (CLIP, ViT, ConvNext-style keys).

        Args:
            processor_dict (`dict`): the image processor's config; an empty dict gives the defaults below.
            default_size (`int`, defaults to 224): resize and crop size when the dict has none (the model's
                `image_size` is the right value for CLIP models).
            default_mean, default_std (`tuple[float, float, float]`): statistics when the dict has none.
        """
        size = processor_dict.get("size") or default_size
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            resize_size = size["shortest_edge"]
        elif "height" in size and "width" in size:
            resize_size = (size["height"], size["width"])
        else:
            raise ValueError(f"Unsupported image processor size {size}: expected 'shortest_edge' or 'height'/'width'.")
        if processor_dict.get("do_resize", True) is False:
            raise ValueError("The image processor does not resize; a reward needs a fixed input size.")

        crop_size = None
        crop_pct = processor_dict.get("crop_pct")
        if crop_pct is not None and isinstance(resize_size, int):
            # ConvNext-style: below 384 px, resize to size / crop_pct and crop `size`; above, warp to a square.
            if resize_size >= 384:
                resize_size = (resize_size, resize_size)
            else:
                resize_size, crop_size = int(resize_size / crop_pct), (resize_size, resize_size)
        elif processor_dict.get("do_center_crop", isinstance(resize_size, int)):
            crop = processor_dict.get("crop_size") or (
                resize_size if isinstance(resize_size, int) else max(resize_size)
            )
            crop_size = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])

        resample = processor_dict.get("resample") or 3
        if resample not in _PIL_RESAMPLE_TO_MODE:
            logger.warning("Resampling filter %s has no antialiased tensor equivalent; using bicubic.", resample)
        if processor_dict.get("do_normalize", True):
            mean = tuple(processor_dict.get("image_mean") or default_mean)
            std = tuple(processor_dict.get("image_std") or default_std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            size=resize_size,
            crop_size=crop_size,
            mean=mean,
            std=std,
            interpolation=_PIL_RESAMPLE_TO_MODE.get(resample, "bicubic"),
            crop_offset_rounding="floor",
        )

    @classmethod
    def from_open_clip_config(cls, preprocess_cfg: dict) -> "ImagePreprocessing":
        """Build from an open_clip model's `preprocess_cfg` (the inference branch of `open_clip.image_transform`)."""
        size = preprocess_cfg.get("size", 224)
        size_hw = (size, size) if isinstance(size, int) else tuple(size)
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode == "shortest":
            if size_hw[0] != size_hw[1]:
                raise ValueError("open_clip's non-square 'shortest' resize is not supported; use a square size.")
            resize_size, crop_size = size_hw[0], size_hw
        elif resize_mode == "squash":
            resize_size, crop_size = size_hw, None
        else:
            raise ValueError(
                f"open_clip resize_mode {resize_mode!r} pads the image, which the differentiable preprocessing does "
                "not support; use 'shortest' or 'squash'."
            )
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        return cls(
            size=resize_size,
            crop_size=crop_size,
            mean=tuple(preprocess_cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(preprocess_cfg.get("std", OPENAI_CLIP_STD)),
            # open_clip maps 'random' to bicubic at inference.
            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
            crop_offset_rounding="round",
        )
