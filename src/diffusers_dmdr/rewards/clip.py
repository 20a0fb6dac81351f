"""Text-image similarity rewards on CLIP-style dual encoders: CLIP score (transformers or open_clip), PickScore
and HPSv2/v2.1.

All three score `scale * <normalised image embedding, normalised text embedding>`; they differ in the checkpoint,
the library that holds the architecture and the scale. The image path runs on tensors (`ImagePreprocessing`), so
gradients reach the generator; the text path has no gradient to carry.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..hub_cache import hub_cache_kwargs
from .preprocessing import ImagePreprocessing
from .weights import (
    RewardLoadError,
    check_cached_when_offline,
    from_pretrained_or_raise,
    image_processor_dict,
    import_open_clip,
    load_pretrained_model,
    load_state_dict_file,
    resolve_weight_file,
)


# The paper's CLIP reward (DMDR §4.1): Apple's DFN5B-trained ViT-H-14, an open_clip checkpoint.
DEFAULT_CLIP_MODEL = "hf-hub:apple/DFN5B-CLIP-ViT-H-14"


class TransformersCLIPTowers(nn.Module):
    r"""Image and text towers of a `transformers.CLIPModel`, returning L2-normalised float32 embeddings.

    Args:
        model (`transformers.CLIPModel`): the dual encoder; its `logit_scale` is kept for PickScore.
        tokenizer: a CLIP tokenizer (`CLIPTokenizer` or `CLIPTokenizerFast`).
        preprocessing (`ImagePreprocessing`): the model's image processor as tensor ops.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocessing: ImagePreprocessing):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        # Truncate prompts to what the position embeddings cover, whatever the tokenizer's own limit says.
        self.max_text_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, processor_name_or_path: str | None = None):
        """Load a `CLIPModel` (safetensors preferred, `.bin` read with `weights_only`) and the tokenizer and image
        processor config from `processor_name_or_path` (defaults to the model's own folder or repository)."""
        from transformers import AutoTokenizer, CLIPModel

        processor_name_or_path = processor_name_or_path or model_name_or_path
        model = load_pretrained_model(CLIPModel, model_name_or_path, "CLIP reward model")
        tokenizer = from_pretrained_or_raise(AutoTokenizer.from_pretrained, processor_name_or_path, "CLIP tokenizer")
        # Without a preprocessor_config.json: CLIP's defaults at the model's own resolution, as CLIPProcessor uses.
        preprocessing = ImagePreprocessing.from_image_processor_dict(
            image_processor_dict(processor_name_or_path), default_size=model.config.vision_config.image_size
        )
        return cls(model, tokenizer, preprocessing)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        model_dtype = self.model.visual_projection.weight.dtype
        pixel_values = self.preprocessing(images).to(model_dtype)
        image_embeds = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(image_embeds.float(), dim=-1)

    def embed_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        text_inputs = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(device)
        text_embeds = self.model.get_text_features(
            input_ids=text_inputs.input_ids, attention_mask=text_inputs.attention_mask
        ).pooler_output
        return F.normalize(text_embeds.float(), dim=-1)

    def drop_text_tower(self) -> None:
        """Delete the text encoder and its projection (the image path, `get_image_features`, never reads them)."""
        self.model.text_model = None
        self.model.text_projection = None


class OpenCLIPTowers(nn.Module):
    r"""Image and text towers of an open_clip model (`open_clip.CLIP` or `CustomTextCLIP`).

    Args:
        model: the open_clip model; `model.visual.preprocess_cfg` gives the preprocessing unless passed.
        tokenizer: the open_clip tokenizer matching the model (`open_clip.get_tokenizer(name)`).
        preprocessing (`ImagePreprocessing`, *optional*): overrides the model's own `preprocess_cfg`.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocessing: ImagePreprocessing | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if preprocessing is None:
            preprocessing = ImagePreprocessing.from_open_clip_config(getattr(model.visual, "preprocess_cfg", {}))
        self.preprocessing = preprocessing

    @classmethod
    def from_pretrained(cls, model_name: str, checkpoint: str | os.PathLike | None = None, activation: str = "config"):
        r"""Build an open_clip model.

        Args:
            model_name (`str`):
                `"hf-hub:org/repo"` or `"local-dir:/folder"` (config and weights from there, read by open_clip with
                safetensors or `weights_only`), a folder holding `open_clip_config.json`, or a built-in
                architecture name such as `"ViT-H-14"` (random weights unless `checkpoint` is given).
            checkpoint (`str` or `os.PathLike`, *optional*):
                A full state dict to load on top (HPS checkpoints are complete ViT-H-14 CLIP weights).
            activation (`str`, defaults to `"config"`):
                The MLP activation of both towers: `"config"` (what the model's open_clip config says), `"gelu"` or
                `"quickgelu"` (override it; see [`open_clip_activation_kwargs`]).
        """
        activation_kwargs = open_clip_activation_kwargs(activation)
        open_clip = import_open_clip("An open_clip reward model")
        if Path(str(model_name)).is_dir():
            model_name = f"local-dir:{model_name}"
        try:
            model = open_clip.create_model(
                model_name,
                load_weights=checkpoint is None,
                require_pretrained=False,
                **activation_kwargs,
                **hub_cache_kwargs(),
            )
            tokenizer = open_clip.get_tokenizer(model_name, **hub_cache_kwargs())
        except Exception as error:
            raise RewardLoadError(
                f"Could not build the open_clip model {model_name!r} ({type(error).__name__}: {error})."
            ) from error
        if checkpoint is not None:
            state_dict = load_state_dict_file(checkpoint)
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                raise RewardLoadError(
                    f"The checkpoint {checkpoint} does not fit the open_clip architecture {model_name!r}: {error}"
                ) from error
        return cls(model, tokenizer)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        model_dtype = next(self.model.visual.parameters()).dtype
        pixel_values = self.preprocessing(images).to(model_dtype)
        return F.normalize(self.model.encode_image(pixel_values).float(), dim=-1)

    def embed_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    # What `encode_text` reads and `encode_image` does not: `open_clip.CLIP` keeps the text tower's parts on the model
    # itself, `CustomTextCLIP` in `text`.
    text_tower_parts = (
        "text",
        "transformer",
        "token_embedding",
        "positional_embedding",
        "ln_final",
        "text_projection",
    )
    text_tower_buffers = ("attn_mask",)

    def drop_text_tower(self) -> None:
        """Delete the text tower's modules, parameters and buffers (`encode_image` reads only `model.visual`)."""
        model = self.model
        for name in self.text_tower_parts + self.text_tower_buffers:
            if name in model._modules or name in model._parameters or name in model._buffers:
                setattr(model, name, None)


OPEN_CLIP_ACTIVATIONS = ("config", "gelu", "quickgelu")


def open_clip_activation_kwargs(activation: str) -> dict:
    """`open_clip.create_model` keyword arguments that pick the towers' activation.

    open_clip merges extra keyword arguments over the model config, so `quick_gelu=False` builds GELU towers even when
    the config asks for QuickGELU, and `force_quick_gelu=True` builds QuickGELU ones. `"config"` passes nothing.
    """
    if activation not in OPEN_CLIP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {OPEN_CLIP_ACTIVATIONS}, got {activation!r}.")
    return {"config": {}, "gelu": {"quick_gelu": False}, "quickgelu": {"force_quick_gelu": True}}[activation]


def _is_open_clip_reference(model: str) -> bool:
    model = str(model)
    return model.startswith(("hf-hub:", "local-dir:")) or (Path(model) / "open_clip_config.json").is_file()


class TextImageReward(nn.Module):
    r"""Base of the embedding-similarity rewards: `score = scale * cos(image embedding, prompt embedding)`.

    Subclasses set `self.towers` (`TransformersCLIPTowers` or `OpenCLIPTowers`) and `use_logit_scale`.
    `RelativeReward` reuses `embed_images`, `embed_prompts` and `score_from_embeddings`.
    """

    use_logit_scale: bool = False
    # Hinge used when a reward spec does not give one; cosine scores sit near 0.3, under the paper's 0.7.
    default_hinge: float | None = 0.7
    # Constructor options that name a model file, folder or Hub id: checked to exist before loading.
    path_options: tuple[str, ...] = ("model", "processor")
    towers: nn.Module

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings `(B, D)` of images in [0, 1], with the graph."""
        return self.towers.embed_images(images)

    # Prompt -> L2-normalised float32 text features on the host, once `cache_text_features` has run (then the text
    # tower is gone and only these prompts can be scored).
    text_features: dict[str, torch.Tensor] | None = None

    def embed_prompts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """L2-normalised float32 prompt embeddings `(B, D)` on `device` (from the cache once there is one)."""
        if self.text_features is None:
            return self.towers.embed_prompts(list(prompts), device)
        missing = [prompt for prompt in prompts if prompt not in self.text_features]
        if missing:
            raise KeyError(
                f"{type(self).__name__}: the text features were cached for the training prompts and the text tower "
                f"was freed (--cache_reward_text_features); {len(missing)} prompt(s) are not among them, e.g. "
                f"{missing[0]!r}."
            )
        return torch.stack([self.text_features[prompt] for prompt in prompts]).to(device)

    @torch.no_grad()
    def cache_text_features(self, prompts: list[str], batch_size: int = 64) -> int:
        """Embed every distinct prompt once, keep the features on the host, and delete the text tower.

        Runs on the device the towers are on, in their dtype and under whatever autocast the caller has entered
        (the trainer enters its mixed-precision context, as the per-step embedding does). Returns the number of
        distinct prompts cached.
        """
        if self.text_features is not None:
            raise RuntimeError(f"{type(self).__name__}: text features are already cached and the text tower is gone.")
        device = next(self.towers.parameters()).device
        distinct = list(dict.fromkeys(prompts))
        features = {}
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            features.update(zip(chunk, self.towers.embed_prompts(chunk, device).cpu().unbind(0), strict=True))
        self.text_features = features
        self.towers.drop_text_tower()
        return len(distinct)

    def score_from_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Row-wise similarity `(B,)` of matching image and text embeddings, times the logit scale if used."""
        scores = (image_embeds * text_embeds).sum(dim=-1)
        return scores * self.towers.logit_scale if self.use_logit_scale else scores

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Score each image against its prompt.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): decoded images in [0, 1], keeping the graph.
            prompts (`list[str]` of length `B`): the prompt of each image.

        Returns:
            `torch.Tensor` of shape `(B,)` in float32.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(prompts)} prompts.")
        image_embeds = self.embed_images(images)
        return self.score_from_embeddings(image_embeds, self.embed_prompts(prompts, images.device))


class CLIPReward(TextImageReward):
    r"""CLIP score for training: cosine similarity of the image and prompt embeddings (DMDR's default reward
    with `DFN5B-CLIP-ViT-H-14`).

    Unlike torchmetrics' `CLIPScore` (an evaluation metric: processor path, `max(100 cos, 0)`), this keeps the
    graph and returns the raw cosine, which sits around 0.2-0.35 for matching pairs.

    Args:
        model (`str`, defaults to `"hf-hub:apple/DFN5B-CLIP-ViT-H-14"`):
            A transformers `CLIPModel` folder or Hub id (e.g. `"openai/clip-vit-large-patch14"`), or an open_clip
            model: `"hf-hub:org/repo"`, `"local-dir:/folder"` or a folder with `open_clip_config.json`
            (open_clip comes with `pip install 'diffusers-dmdr[rewards]'`).
        processor (`str`, *optional*):
            transformers only: where the tokenizer and `preprocessor_config.json` live, when not next to the model.
        backend (`str`, defaults to `"auto"`):
            `"transformers"`, `"open_clip"` or `"auto"` (open_clip for `hf-hub:`/`local-dir:` names and folders
            with `open_clip_config.json`, else transformers).
        activation (`str`, *optional*):
            open_clip only: the towers' MLP activation. The released DMDR code builds open_clip `ViT-H-14` (GELU) and
            loads the DFN5B weights into it, while open_clip's own DFN5B config says QuickGELU; so the default is
            `"gelu"` for the default DFN5B model (the released behaviour) and `"config"` (the model's config) for
            any other. `"quickgelu"` gives open_clip's registered DFN5B.
    """

    # Model options that name a folder or Hub id (checked before any weight loads).
    path_options = ("model", "processor")

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        processor: str | None = None,
        backend: str = "auto",
        activation: str | None = None,
    ):
        super().__init__()
        if backend not in ("auto", "transformers", "open_clip"):
            raise ValueError(f"backend must be 'auto', 'transformers' or 'open_clip', got {backend!r}.")
        uses_open_clip = backend == "open_clip" or (backend == "auto" and _is_open_clip_reference(model))
        if activation not in (None, "config") and not uses_open_clip:
            raise ValueError(
                f"activation={activation!r} applies to open_clip models; {model!r} loads in transformers."
            )
        if activation is None:
            activation = "gelu" if model == DEFAULT_CLIP_MODEL else "config"
        if uses_open_clip:
            self.towers = OpenCLIPTowers.from_pretrained(model, activation=activation)
        else:
            self.towers = TransformersCLIPTowers.from_pretrained(model, processor)

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Raise `ImportError` before any weights load when the chosen model needs open_clip and it is missing."""
        model, backend = options.get("model", DEFAULT_CLIP_MODEL), options.get("backend", "auto")
        if backend == "open_clip" or (backend == "auto" and _is_open_clip_reference(model)):
            import_open_clip(f"The CLIP reward model {model!r}")


# PickScore's checkpoint, and the CLIP-H model it was fine-tuned from, whose tokenizer and image processor it uses.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(CLIPReward):
    r"""PickScore (Kirstain et al., https://huggingface.co/papers/2305.01569): `logit_scale.exp() * cos`, about
    18-23 for typical images; a CLIP-H `CLIPModel` fine-tuned on Pick-a-Pic preferences.

    Args:
        model (`str`, defaults to `"yuvalkirstain/PickScore_v1"`): the PickScore `CLIPModel` folder or Hub id.
        processor (`str`, *optional*):
            Where the tokenizer and image processor live. Unset: the model's own folder when `model` is a local folder
            (a local copy is used offline, whole), else `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`, the CLIP-H model
            PickScore was fine-tuned from (its published usage).
    """

    use_logit_scale = True
    # Scores live around 20, so a 0.7 hinge would never be active: the registry defaults PickScore to linear.
    default_hinge = None

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str | None = None):
        super().__init__(model=model, processor=self.resolve_processor(model, processor), backend="transformers")

    @staticmethod
    def resolve_processor(model: str, processor: str | None) -> str:
        """`processor` as given, else the model's folder when it is local, else PickScore's CLIP-H processor."""
        if processor is not None:
            return processor
        return model if Path(str(model)).expanduser().is_dir() else PICKSCORE_PROCESSOR

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Before any weight loads: a local model folder used as its own processor holds a tokenizer, and (offline)
        the processor's Hub repository is cached."""
        model = str(options.get("model", PICKSCORE_MODEL))
        processor = cls.resolve_processor(model, options.get("processor"))
        folder = Path(processor).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            raise ValueError(
                f"Reward 'pickscore': {folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt), and without "
                f"processor= the tokenizer is read from the model's folder: give processor=<a CLIP-H tokenizer folder> "
                f"or save the tokenizer there (PickScore uses {PICKSCORE_PROCESSOR}'s)."
            )
        check_cached_when_offline("pickscore", "model", model)
        check_cached_when_offline("pickscore", "processor", processor)


class HPSReward(TextImageReward):
    r"""Human Preference Score v2.1 (Wu et al., https://huggingface.co/papers/2306.09341): an open_clip ViT-H-14
    fine-tuned on human preferences; score = cosine of the normalised embeddings (about 0.25-0.35), as
    `hpsv2.score` computes it, without the `hpsv2` package and its pinned dependencies.

    The paper prefixes HPS prompts with `"Realistic photo "` (set `prompt_prefix` in the reward spec).

    Args:
        model (`str`, defaults to `"xswu/HPSv2"`): a checkpoint file, a folder holding `filename`, or a Hub id.
        filename (`str`, defaults to `"HPS_v2.1_compressed.pt"`): the checkpoint inside the folder or repository.
        architecture (`str`, defaults to `"ViT-H-14"`):
            The open_clip architecture the checkpoint fits: a built-in name, or `local-dir:` / a folder with an
            `open_clip_config.json` (tests use a tiny one).
    """

    default_filename = "HPS_v2.1_compressed.pt"
    path_options = ("model", "architecture")

    def __init__(self, model: str = "xswu/HPSv2", filename: str | None = None, architecture: str = "ViT-H-14"):
        super().__init__()
        checkpoint = resolve_weight_file(model, filename or self.default_filename)
        self.towers = OpenCLIPTowers.from_pretrained(architecture, checkpoint=checkpoint)

    @classmethod
    def check_requirements(cls, options: dict) -> None:
        """Raise `ImportError` before any weights load when open_clip is missing."""
        import_open_clip("The HPS reward")


class HPSv2Reward(HPSReward):
    """HPS v2 (the first release, `HPS_v2_compressed.pt`); same architecture and score as `HPSReward` (v2.1)."""

    default_filename = "HPS_v2_compressed.pt"


# The text-image rewards by registry name (`rewards.REWARD_REGISTRY` includes them; `RelativeReward` wraps one).
TEXT_IMAGE_REWARDS = {"clip": CLIPReward, "hpsv2.1": HPSReward, "hpsv2": HPSv2Reward, "pickscore": PickScoreReward}


def cache_reward_text_features(rewards: list, prompts: list[str], autocast=None) -> list[str]:
    """`--cache_reward_text_features`: for every loaded reward that is a CLIP-style text-image reward
    ([`TextImageReward`]: clip, hpsv2, hpsv2.1, pickscore), embed the prompts once (with the reward's `prompt_prefix`),
    keep the features on the host and free its text tower. Others (no text tower, or prompts that change per step
    like the relative reward's) are left as they are. Returns the display names of the rewards cached.

    Args:
        rewards (`list[LoadedReward]`): the run's rewards (the same reward object listed twice is cached once).
        prompts (`list[str]`): every prompt the rewards will score.
        autocast (`Callable`, *optional*): the mixed-precision context the per-step scoring runs under.
    """
    from contextlib import nullcontext

    cached, seen = [], set()
    for loaded in rewards:
        frozen = loaded.fn
        reward = getattr(frozen, "reward", None)
        if not isinstance(reward, TextImageReward) or id(reward) in seen:
            continue
        seen.add(id(reward))
        prefix = getattr(frozen, "prompt_prefix", "")
        with autocast() if autocast is not None else nullcontext():
            reward.cache_text_features([prefix + prompt for prompt in prompts])
        cached.append(loaded.name)
    return cached
