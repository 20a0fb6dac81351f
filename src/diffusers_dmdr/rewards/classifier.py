"""Classifier reward: the log-probability that an image classifier assigns to the class named in the prompt.

DMDR's class-conditional ImageNet recipe rewards a frozen classifier's cross-entropy against the label (weight
0.05); `-cross_entropy` is this log-probability. Any classifier works: a transformers
`AutoModelForImageClassification` folder or Hub id, or a torch module built by a dotted import path.
"""

import re
from pathlib import Path

import torch
from torch import nn

from .imports import resolve_module_class
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from .weights import (
    RewardLoadError,
    check_model_reference,
    image_processor_dict,
    load_pretrained_model,
    load_state_dict_file,
)


def _read_labels(labels: str | list[str]) -> list[str]:
    if isinstance(labels, str):
        path = Path(labels)
        if not path.is_file():
            raise ValueError(f"labels={labels!r} is not a file with one class name per line.")
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ValueError("The classifier reward needs at least one class label.")
    return list(labels)


class LabelMatcher:
    r"""Finds the class a prompt names.

    Each label may list synonyms separated by commas (ImageNet style: `"tench, Tinca tinca"`). A prompt that is
    an integer is a class index; otherwise the longest synonym found in the prompt as whole words
    (case-insensitive) wins, ties going to the lower class index.
    """

    def __init__(self, labels: list[str]):
        self.labels = labels
        synonyms = [
            (len(synonym), -index, index, re.compile(rf"(?<!\w){re.escape(synonym)}(?!\w)", re.IGNORECASE))
            for index, label in enumerate(labels)
            for synonym in (part.strip() for part in label.split(","))
            if synonym
        ]
        self._patterns = sorted(synonyms, key=lambda entry: entry[:2], reverse=True)

    def __call__(self, prompt: str) -> int:
        if prompt.strip().isdigit():
            index = int(prompt.strip())
            if index >= len(self.labels):
                raise ValueError(f"Class index {index} is out of range for {len(self.labels)} labels.")
            return index
        for *_, index, pattern in self._patterns:
            if pattern.search(prompt):
                return index
        raise ValueError(
            f"No class label of the classifier reward appears in the prompt {prompt!r}; prompts must name a class "
            f"(e.g. {self.labels[0]!r}) or be a class index."
        )


class ClassifierReward(nn.Module):
    r"""Log-probability of the prompt's class under a frozen image classifier (`log_softmax(logits)[label]`, <= 0).

    Give either `model` (transformers) or `module` (any torch classifier):

    Args:
        model (`str`, *optional*):
            An `AutoModelForImageClassification` folder or Hub id; labels come from its `config.id2label` and the
            preprocessing from its `preprocessor_config.json` (ImageNet statistics when absent).
        module (`str`, *optional*):
            Dotted import path to a class or factory returning an `nn.Module` that maps normalised pixel values
            `(B, 3, S, S)` to logits `(B, num_classes)`, e.g. a DINOv2 linear classifier.
        module_options (`dict`, *optional*): keyword arguments of `module`.
        checkpoint (`str`, *optional*): a state dict (safetensors or `weights_only` file) loaded into `module`.
        labels (`str` or `list[str]`, *optional*):
            Class names (or a text file, one per line), required with `module`; comma-separated synonyms allowed.
        image_size (`int`, defaults to 224): `module` input size (antialiased bicubic resize to a square).
        mean, std (`tuple[float, float, float]`): `module` input normalisation, ImageNet statistics by default.
    """

    # Log-probabilities are <= 0, always under a 0.7 hinge: linear by default.
    default_hinge = None
    path_options = ("model", "checkpoint")
    # Options holding an import path to user code: from a recipe file they need --allow_reward_import_paths.
    import_path_options = ("module",)

    def __init__(
        self,
        model: str | None = None,
        module: str | None = None,
        module_options: dict | None = None,
        checkpoint: str | None = None,
        labels: str | list[str] | None = None,
        image_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        self.check_requirements({"model": model, "module": module, "labels": labels, "checkpoint": checkpoint})
        if model is not None:
            from transformers import AutoModelForImageClassification

            self.classifier = load_pretrained_model(AutoModelForImageClassification, model, "classifier reward model")
            id2label = self.classifier.config.id2label
            labels = [id2label[index] for index in range(len(id2label))] if labels is None else labels
            processor_dict = image_processor_dict(model)
            self.preprocessing = ImagePreprocessing.from_image_processor_dict(
                processor_dict,
                default_size=getattr(self.classifier.config, "image_size", image_size),
                default_mean=IMAGENET_MEAN,
                default_std=IMAGENET_STD,
            )
            self.uses_transformers = True
        else:
            self.classifier = resolve_module_class(module, "Classifier module")(**(module_options or {}))
            if checkpoint is not None:
                try:
                    self.classifier.load_state_dict(load_state_dict_file(checkpoint), strict=True)
                except RuntimeError as error:
                    raise RewardLoadError(f"{checkpoint} does not fit the classifier {module!r}: {error}") from error
            self.preprocessing = ImagePreprocessing(
                size=(image_size, image_size), crop_size=None, mean=tuple(mean), std=tuple(std)
            )
            self.uses_transformers = False
        self.matcher = LabelMatcher(_read_labels(labels))

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Exactly one of `model` and `module`; `module` needs `labels` and must import."""
        model, module = options.get("model"), options.get("module")
        if (model is None) == (module is None):
            raise ValueError(
                "The classifier reward needs exactly one of model=<transformers classifier> or module=<import path>."
            )
        if module is not None:
            if options.get("labels") is None:
                raise ValueError("The classifier reward with module= needs labels= (a list or a file of class names).")
            resolve_module_class(str(module), "Classifier module")
        if isinstance(options.get("labels"), str):
            check_model_reference(options["labels"], "labels")

    @property
    def example_prompts(self) -> list[str]:
        """Prompts naming real classes, for the load-time gradient probe."""
        return [label.split(",")[0] for label in self.matcher.labels[:2]]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Log-probability `(B,)` of each prompt's class for images `(B, 3, H, W)` in [0, 1]."""
        class_indices = torch.tensor([self.matcher(prompt) for prompt in prompts], device=images.device)
        model_dtype = next(self.classifier.parameters()).dtype
        pixel_values = self.preprocessing(images).to(model_dtype)
        if self.uses_transformers:
            logits = self.classifier(pixel_values=pixel_values).logits
        else:
            logits = self.classifier(pixel_values)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return log_probs.gather(1, class_indices[:, None]).squeeze(1)
