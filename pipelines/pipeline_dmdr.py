# Copyright 2026 The diffusers-dmdr authors. Licensed under the Apache License, Version 2.0.
"""FewStepDMDRPipeline: text-to-image sampling with a DMDR few-step student, run by the family's stock pipeline.

This file is self-contained (torch, diffusers, transformers and huggingface_hub only) so that it can be copied
verbatim into an exported Hub folder as `pipeline_dmdr.py` and loaded by users who do not have `diffusers_dmdr`
installed.
"""

import importlib
import inspect
import json
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import PreTrainedModel


logger = logging.get_logger(__name__)

# How an exported folder names its code, so that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` runs
# it: `pipeline_dmdr.py` at the root, `scheduler/scheduling_dmdr.py` beside the scheduler config.
PIPELINE_MODULE, PIPELINE_CLASS = "pipeline_dmdr", "FewStepDMDRPipeline"
SCHEDULER_MODULE, SCHEDULER_CLASS = "scheduling_dmdr", "DMDRScheduler"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> # An export of diffusers-dmdr ships this file; `trust_remote_code` lets diffusers run it.
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "org/sdxl-dmdr-4step", trust_remote_code=True, dtype=torch.float16
        ... ).to("cuda")
        >>> # The trained step count and no classifier-free guidance are the defaults.
        >>> image = pipe("a photo of a red fox in the snow").images[0]
        ```
"""


@dataclass(frozen=True)
class StockRoute:
    """How [`FewStepDMDRPipeline`] drives one stock diffusers pipeline: adding a model family is adding one of these.

    Args:
        family: the short family name (`"sdxl"`, `"sd15"`, `"sd3"`, ...).
        backbone_class: class name of the backbone that identifies the family.
        backbone: the component name of the backbone (`"unet"` or `"transformer"`).
        vae_class: class name of the family's autoencoder.
        requires: components that must be present (told apart from families with the same backbone class).
        excludes: components that must be absent.
        backbone_config: values the backbone's config must hold (tells SDXL's UNet from SD1.5's when no text encoder
            is given, as in a pipeline that samples from precomputed prompt embeddings).
        guidance_argument: the call argument that switches classifier-free guidance on above `guidance_threshold`.
        guidance_threshold: guidance is on above this value (1 for most pipelines, 0 for Z-Image).
        grid_argument: how the trained grid reaches the scheduler: `"num_inference_steps"` (the pipeline asks the
            scheduler for its own grid), `"timesteps"` or `"sigmas"` (for pipelines that otherwise pass their own).
        call_defaults: call arguments the student was trained with (guidance off, prompt length, ...).
        init_kwargs: constructor arguments of the stock pipeline that are not components.
    """

    family: str
    backbone_class: str
    backbone: str
    vae_class: str = "AutoencoderKL"
    requires: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    backbone_config: dict = field(default_factory=dict)
    guidance_argument: str = "guidance_scale"
    guidance_threshold: float = 1.0
    grid_argument: str = "num_inference_steps"
    call_defaults: dict = field(default_factory=dict)
    init_kwargs: dict = field(default_factory=dict)


# The stock pipeline that runs each family, first match wins. The student samples without classifier-free
# guidance, so guidance is off by default; the SD3 students are trained with 128 T5 tokens (the released scripts),
# while the stock pipeline pads to 256, which would change the joint-attention context the student sees.
STOCK_ROUTES: dict[str, StockRoute] = {
    "StableDiffusionXLPipeline": StockRoute(
        family="sdxl",
        backbone_class="UNet2DConditionModel",
        backbone="unet",
        requires=("text_encoder_2",),
        backbone_config={"addition_embed_type": "text_time"},
        call_defaults={"guidance_scale": 0.0},
        init_kwargs={"add_watermarker": False},
    ),
    "StableDiffusionPipeline": StockRoute(
        family="sd15",
        backbone_class="UNet2DConditionModel",
        backbone="unet",
        excludes=("text_encoder_2",),
        backbone_config={"addition_embed_type": None},
        call_defaults={"guidance_scale": 0.0},
        init_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    ),
    "StableDiffusion3Pipeline": StockRoute(
        family="sd3",
        backbone_class="SD3Transformer2DModel",
        backbone="transformer",
        call_defaults={"guidance_scale": 0.0, "max_sequence_length": 128},
    ),
    # FLUX.1 [dev] is guidance-distilled: `guidance_scale` is the guidance *embedding* (the export stores the trained
    # one in `call_defaults`), and classifier-free guidance is `true_cfg_scale` with a negative prompt, off as trained.
    "FluxPipeline": StockRoute(
        family="flux",
        backbone_class="FluxTransformer2DModel",
        backbone="transformer",
        guidance_argument="true_cfg_scale",
        call_defaults={"guidance_scale": 3.5, "true_cfg_scale": 1.0, "max_sequence_length": 512},
    ),
    # FLUX.2 [klein] base: no guidance embedding; true CFG against the empty prompt above `guidance_scale` 1.
    "Flux2KleinPipeline": StockRoute(
        family="flux2",
        backbone_class="Flux2Transformer2DModel",
        backbone="transformer",
        vae_class="AutoencoderKLFlux2",
        call_defaults={"guidance_scale": 1.0, "max_sequence_length": 512},
    ),
    # Z-Image's CFG is on for any guidance_scale > 0 (`cond + g (cond - uncond)`): 0 is the trained setting. The
    # pipeline passes its own default sigmas, so the trained grid goes in as `sigmas` (it also passes `mu`, ignored).
    "ZImagePipeline": StockRoute(
        family="zimage",
        backbone_class="ZImageTransformer2DModel",
        backbone="transformer",
        grid_argument="sigmas",
        guidance_threshold=0.0,
        call_defaults={"guidance_scale": 0.0},
    ),
    # Qwen-Image's CFG is `true_cfg_scale` > 1 with a negative prompt (its `guidance_scale` is for guidance-distilled
    # checkpoints only); 1 keeps it off without the stock pipeline's warning about a missing negative prompt.
    "QwenImagePipeline": StockRoute(
        family="qwenimage",
        backbone_class="QwenImageTransformer2DModel",
        backbone="transformer",
        vae_class="AutoencoderKLQwenImage",
        guidance_argument="true_cfg_scale",
        grid_argument="sigmas",
        call_defaults={"true_cfg_scale": 1.0},
    ),
    # Wan text-to-video: CFG is on for guidance_scale > 1 (stock default 5.0), so 1 is the trained setting; the stock
    # pipeline asks the scheduler for its own grid. The export adds the trained size and frame count to
    # `call_defaults` and Wan 2.2 TI2V-5B's `expand_timesteps` to `stock_init_kwargs`. The output is `frames`.
    "WanPipeline": StockRoute(
        family="wan",
        backbone_class="WanTransformer3DModel",
        backbone="transformer",
        vae_class="AutoencoderKLWan",
        call_defaults={"guidance_scale": 1.0, "max_sequence_length": 512},
    ),
}


def _component_types(names) -> object:
    """The union of the diffusers classes named in the routes: the type hints diffusers checks components against
    (`from_pipe` switches a model component over only when its class is in the hint)."""
    import diffusers

    return typing.Union[tuple(dict.fromkeys(getattr(diffusers, name) for name in names))]  # noqa: UP007


UNetBackbone = _component_types(r.backbone_class for r in STOCK_ROUTES.values() if r.backbone == "unet")
TransformerBackbone = _component_types(r.backbone_class for r in STOCK_ROUTES.values() if r.backbone == "transformer")
Autoencoder = _component_types(r.vae_class for r in STOCK_ROUTES.values())


@dataclass
class FewStepDMDRPipelineOutput(BaseOutput):
    """
    Output of [`FewStepDMDRPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (or latents with `output_type="latent"`), `batch_size * num_images_per_prompt` of
            them. For video families (Wan) the videos, as the stock pipeline's `frames`.
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`, *optional*):
            Video families only: the same videos under the stock video pipelines' name (`None` for images).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    frames: typing.Any = None


class FewStepDMDRPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with a few-step student distilled by DMDR (https://huggingface.co/papers/2511.13649).

    The student samples with its own training sampler, the [`DMDRScheduler`]: at each student timestep the backbone's
    output becomes a clean prediction `x0`, which is re-noised to the next student timestep (with fresh noise, or
    deterministically for students trained with the ODE sampler); the last step returns `x0`. Given the same generator,
    the output equals the trainer's own N-step sampler (in float32; in half precision the stock pipelines draw the
    initial noise in the model's dtype, so pass float32 `latents` to match exactly).

    This class owns no sampling loop: it builds the family's stock diffusers pipeline (`StableDiffusionXLPipeline`,
    `StableDiffusionPipeline`, `StableDiffusion3Pipeline`, ...; see `STOCK_ROUTES`) around its own modules and
    calls it with the trained grid and guidance off. Every argument of that pipeline (`prompt_embeds`,
    `negative_prompt_embeds`, `cross_attention_kwargs`, `callback_on_step_end`, IP-adapter images, `output_type`,
    ...) works here too.

    Args:
        vae ([`AutoencoderKL`] or another diffusers autoencoder):
            Decodes latents to images.
        text_encoder ([`~transformers.PreTrainedModel`]):
            The first text encoder of the family.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer of `text_encoder`.
        scheduler ([`DMDRScheduler`]):
            The student's sampler; its config holds the trained timesteps and the prediction type.
        unet ([`UNet2DConditionModel`], *optional*):
            The student backbone of the UNet families (SDXL, SD1.5).
        transformer ([`~diffusers.ModelMixin`], *optional*):
            The student backbone of the transformer families (SD3, ...).
        text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (*optional*):
            The family's further text encoders and tokenizers, named as in its stock pipeline.
        stock_pipeline (`str`, *optional*):
            The stock pipeline class that runs this student (a key of `STOCK_ROUTES`); found from the components
            when not given.
        call_defaults (`dict`, *optional*):
            Call arguments this student was trained with, over the route's own defaults (saved in
            `model_index.json`): FLUX.1 [dev]'s trained `guidance_scale` embedding, the prompt length, Wan's size and
            frame count.
        stock_init_kwargs (`dict`, *optional*):
            Constructor arguments of the stock pipeline that depend on the teacher checkpoint, over the route's
            `init_kwargs` (Wan 2.2 TI2V-5B's `expand_timesteps=True`).
        expand_timesteps (`bool`, *optional*):
            Wan 2.2 TI2V-5B's `WanPipeline` flag (per-token timesteps), read from the teacher's `model_index.json`
            when this class loads a teacher folder; `True` adds it to `stock_init_kwargs`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]

    def __init__(
        self,
        vae: Autoencoder,
        text_encoder: PreTrainedModel,
        tokenizer,
        scheduler: SchedulerMixin,
        unet: UNetBackbone | None = None,
        transformer: TransformerBackbone | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2=None,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3=None,
        stock_pipeline: str | None = None,
        call_defaults: dict | None = None,
        stock_init_kwargs: dict | None = None,
        expand_timesteps: bool | None = None,
    ):
        super().__init__()
        # With only text encoders and tokenizers, the pipeline encodes prompts (`encode_prompt`) and nothing else:
        # diffusers' pattern for computing the embeddings on another device than the one that samples.
        encoders_only = unet is None and transformer is None and vae is None and scheduler is None
        if encoders_only and text_encoder is None:
            raise ValueError("Pass a backbone (`unet` or `transformer`), or the text encoders to encode prompts.")
        if (unet is None) == (transformer is None) and not encoders_only:
            raise ValueError(
                "Pass exactly one backbone: `unet` (SDXL, SD1.5) or `transformer` (SD3 and later); or only the text "
                "encoders and tokenizers (no vae, scheduler or backbone) to encode prompts."
            )
        components = {
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "scheduler": scheduler,
            "unet": unet,
            "transformer": transformer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2,
            "text_encoder_3": text_encoder_3,
            "tokenizer_3": tokenizer_3,
        }
        stock_pipeline = stock_pipeline or _find_stock_pipeline(components)
        if stock_pipeline not in STOCK_ROUTES:
            raise ValueError(f"Unknown stock_pipeline {stock_pipeline!r}; known: {sorted(STOCK_ROUTES)}.")
        if not encoders_only and type(scheduler).__name__ != SCHEDULER_CLASS:
            raise ValueError(
                f"FewStepDMDRPipeline samples with the student's {SCHEDULER_CLASS}, got {type(scheduler).__name__}. "
                "To run the student with a stock scheduler, use the stock pipeline itself (see the model card)."
            )
        self.register_modules(**components)
        # Per-export call defaults over the route's (the trained guidance embedding, the prompt length, ...).
        self.register_to_config(stock_pipeline=stock_pipeline, call_defaults=dict(call_defaults or {}))
        if expand_timesteps:
            stock_init_kwargs = {**(stock_init_kwargs or {}), "expand_timesteps": True}
        if stock_init_kwargs:
            # Only when set, so that the image families' saved configs stay as they were.
            self.register_to_config(stock_init_kwargs=dict(stock_init_kwargs))

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def _dict_from_json_file(cls, json_file):
        return _resolve_own_class_name(super()._dict_from_json_file(json_file), cls.__name__)

    @classmethod
    def load_config(cls, *args, **kwargs):
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        # An export names `scheduler/scheduling_dmdr.py`; when this file is installed as part of a package, the same
        # scheduler sits next to it and is used instead of the repository's copy. (Loaded as repository code itself,
        # this file leaves the entry alone: diffusers then asks for `trust_remote_code`.)
        installed = bool(__package__) and not __package__.startswith("diffusers_modules")
        if list(config.get("scheduler") or []) == [SCHEDULER_MODULE, SCHEDULER_CLASS] and installed:
            # Installed, the scheduler module ships beside this one: failing to import it is a broken install.
            scheduler_module = importlib.import_module(f".{SCHEDULER_MODULE}", __package__)
            config["scheduler"] = [scheduler_module.__name__, SCHEDULER_CLASS]
        return outputs

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """Save in the repository-code form, so that every loading route works on the folder (and on its Hub copy).

        diffusers' own `save_pretrained` writes `_class_name` as a plain string and names the scheduler by the Python
        module it was loaded from; this rewrites `model_index.json` to `["pipeline_dmdr", "FewStepDMDRPipeline"]` and
        `["scheduling_dmdr", "DMDRScheduler"]` and copies both code files in. With `push_to_hub=True` the folder is
        then uploaded (`repo_id`, `commit_message`, `private`, `token`, `create_pr` as in diffusers).
        """
        hub_kwargs = {
            name: kwargs.pop(name)
            for name in ("repo_id", "commit_message", "private", "token", "create_pr")
            if name in kwargs
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code_form(save_directory, type(self.scheduler))
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = hub_kwargs.pop("repo_id", None) or Path(save_directory).name
            token = hub_kwargs.get("token")
            repo_id = create_repo(repo_id, private=hub_kwargs.get("private"), token=token, exist_ok=True).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                commit_message=hub_kwargs.get("commit_message") or "Upload FewStepDMDRPipeline",
                token=token,
                create_pr=hub_kwargs.get("create_pr", False),
            )

    # ------------------------------------------------------------------------------------------------------------
    # The stock pipeline
    # ------------------------------------------------------------------------------------------------------------
    @property
    def route(self) -> StockRoute:
        return STOCK_ROUTES[self.config.stock_pipeline]

    @property
    def model_family(self) -> str:
        """The family name of the stock route: `"sdxl"`, `"sd15"`, `"sd3"`, ..."""
        return self.route.family

    @property
    def backbone(self) -> torch.nn.Module:
        """The student backbone: `unet` or `transformer`."""
        return getattr(self, self.route.backbone)

    def stock_pipeline(self) -> DiffusionPipeline:
        """The family's stock diffusers pipeline around this pipeline's own modules (nothing is copied)."""
        import diffusers

        pipeline_class = getattr(diffusers, self.config.stock_pipeline)
        parameters = inspect.signature(pipeline_class.__init__).parameters
        kwargs = {}
        init_kwargs = {**self.route.init_kwargs, **(self.config.get("stock_init_kwargs") or {})}
        for name, parameter in parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if name in init_kwargs:
                kwargs[name] = init_kwargs[name]
            elif name in self.components:
                kwargs[name] = self.components[name]
            elif parameter.default is inspect.Parameter.empty:
                kwargs[name] = None  # a component this family's students do not use (an image encoder, ...)
        stock = pipeline_class(**kwargs)
        stock.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return stock

    def encode_prompt(self, *args, **kwargs):
        """The stock pipeline's `encode_prompt` (same arguments and return values): prompts are encoded exactly as the
        teacher and the trainer encode them, and as `__call__` encodes them: the call defaults the student was trained
        with that are `encode_prompt` arguments (SD3's 128 T5 tokens) apply unless given."""
        stock = self.stock_pipeline()
        signature = inspect.signature(stock.encode_prompt)
        given = signature.bind_partial(*args, **kwargs).arguments
        defaults = {**self.route.call_defaults, **(self.config.get("call_defaults") or {})}
        trained = {
            name: value for name, value in defaults.items() if name in signature.parameters and name not in given
        }
        return stock.encode_prompt(*args, **kwargs, **trained)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        joint_attention_kwargs: dict | None = None,
        attention_kwargs: dict | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        **kwargs,
    ) -> FewStepDMDRPipelineOutput | tuple:
        r"""
        Generate images with the student's few-step sampler, through the family's stock pipeline.

        Every argument of the stock pipeline is accepted and passed on. What changes are the defaults:

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts (or pass `prompt_embeds` and the family's other embeddings).
            num_inference_steps (`int`, *optional*):
                Sampling steps; defaults to the trained count. Another count works with a warning: the scheduler then
                interpolates the trained timesteps linearly, keeping the first and the last (see
                [`DMDRScheduler.grid_for`]).
            timesteps (`list[float]`, *optional*) or sigmas (`list[float]`, *optional*, flow families):
                An explicit grid instead of the trained one.
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; values up to 1 disable guidance (the trained setting). Families with a
                guidance embedding default to the embedding the student was trained at.
            height, width (`int`, *optional*):
                The image size; defaults to the stock pipeline's, or to the trained resolution when the export
                recorded it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the initial noise and of the fresh noise of every re-noising step (also for the stock flow
                pipelines, which do not pass it to the scheduler themselves); the same generator gives the trainer's
                samples.
            return_dict (`bool`, defaults to `True`):
                Return a [`FewStepDMDRPipelineOutput`] instead of a tuple.
            The other named parameters (`prompt_2`, `negative_prompt`, `prompt_embeds`, `output_type`, the
            attention kwargs, `callback_on_step_end`, `max_sequence_length`, ...) are the stock pipelines' own, passed
            on when set (`None` keeps the stock or the trained default); a family's other arguments go through
            `**kwargs`.

        Examples:

        Returns:
            [`FewStepDMDRPipelineOutput`] or `tuple`: the images, as a dataclass or as a 1-tuple.
        """
        if self.backbone is None:
            raise ValueError(
                "This FewStepDMDRPipeline holds only text encoders: it encodes prompts (`encode_prompt`); build it "
                "with the backbone, vae and scheduler to sample."
            )
        named = {
            "prompt_2": prompt_2,
            "prompt_3": prompt_3,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "true_cfg_scale": true_cfg_scale,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
            "negative_prompt_3": negative_prompt_3,
            "num_images_per_prompt": num_images_per_prompt,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "output_type": output_type,
            "cross_attention_kwargs": cross_attention_kwargs,
            "joint_attention_kwargs": joint_attention_kwargs,
            "attention_kwargs": attention_kwargs,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            "max_sequence_length": max_sequence_length,
        }
        # Only what the caller set reaches the stock pipeline: each family takes its own subset of these.
        kwargs = {**{name: value for name, value in named.items() if value is not None}, **kwargs}
        route = self.route
        call_kwargs = {**route.call_defaults, **(self.config.get("call_defaults") or {}), **kwargs}
        if not any(call_kwargs.get(name) is not None for name in ("num_inference_steps", "timesteps", "sigmas")):
            call_kwargs.update(self._trained_grid_kwargs(route.grid_argument))
        guidance = call_kwargs.get(route.guidance_argument)
        guidance_on = guidance is not None and guidance > route.guidance_threshold
        if not guidance_on:
            ignored = [name for name in ("negative_prompt", "negative_prompt_embeds") if kwargs.get(name) is not None]
            if ignored:
                logger.warning(
                    f"{' and '.join(ignored)} is ignored: classifier-free guidance is off "
                    f"({route.guidance_argument}={guidance}), as the student was trained. Pass "
                    f"{route.guidance_argument} > {route.guidance_threshold:g} to use it."
                )
        if isinstance(prompt, list):
            prompt = list(prompt)  # ZImagePipeline.encode_prompt rewrites the caller's list in place
        self.scheduler.set_noise_generator(call_kwargs.get("generator"))
        try:
            # By name: `Flux2KleinPipeline` takes a conditioning `image` first.
            output = self.stock_pipeline()(prompt=prompt, return_dict=True, **call_kwargs)
        finally:
            self.scheduler.set_noise_generator(None)
        self.maybe_free_model_hooks()
        # The stock video pipelines (Wan) return `frames`.
        videos = getattr(output, "frames", None)
        images = output.images if videos is None else videos
        if not return_dict:
            return (images,)
        return FewStepDMDRPipelineOutput(images=images, frames=videos)

    def _trained_grid_kwargs(self, grid_argument: str) -> dict:
        trained = [float(timestep) for timestep in self.scheduler.config.training_timesteps]
        if grid_argument == "num_inference_steps":
            return {"num_inference_steps": len(trained)}
        if grid_argument == "timesteps":
            return {"timesteps": trained}
        levels = torch.tensor(trained, dtype=torch.float32) / self.scheduler.config.num_train_timesteps
        return {"sigmas": levels.tolist()}


def _find_stock_pipeline(components: dict) -> str:
    """The first stock route whose backbone class and required / excluded components match (without a backbone:
    whose text encoders match, see [`_find_stock_pipeline_by_text_encoders`])."""
    if components.get("unet") is None and components.get("transformer") is None:
        return _find_stock_pipeline_by_text_encoders(components)
    backbone = components.get("transformer") if components.get("unet") is None else components.get("unet")
    backbone_class = type(backbone).__name__
    backbone_config = getattr(backbone, "config", {})
    # Without any text encoder (a pipeline fed precomputed prompt embeddings) the components cannot tell the families
    # apart: the backbone's config does.
    has_text_encoder = any(value is not None for key, value in components.items() if key.startswith("text_encoder"))
    for name, route in STOCK_ROUTES.items():
        if route.backbone_class != backbone_class or components.get(route.backbone) is None:
            continue
        if any(backbone_config.get(key) != value for key, value in route.backbone_config.items()):
            continue
        checked = [c for c in route.requires + route.excludes if has_text_encoder or not c.startswith("text_encoder")]
        if all(components.get(c) is not None for c in route.requires if c in checked) and all(
            components.get(c) is None for c in route.excludes if c in checked
        ):
            return name
    raise ValueError(
        f"No stock pipeline runs a {backbone_class} student with these components; pass `stock_pipeline=` (one of "
        f"{sorted(STOCK_ROUTES)})."
    )


def _find_stock_pipeline_by_text_encoders(components: dict) -> str:
    """The first stock route whose pipeline takes exactly the given text encoders (`text_encoder`, `_2`, `_3`), each
    of the class its `__init__` annotates: SDXL (two CLIP encoders) and SD3 (two CLIP and a T5) are told apart
    by what they are given."""
    import diffusers

    given = {name: module for name, module in components.items() if name.startswith("text_encoder") and module}
    for name in STOCK_ROUTES:
        parameters = inspect.signature(getattr(diffusers, name).__init__).parameters
        wanted = {key: parameter for key, parameter in parameters.items() if key.startswith("text_encoder")}
        if set(wanted) != set(given):
            continue
        if all(
            not isinstance(parameter.annotation, type) or isinstance(given[key], parameter.annotation)
            for key, parameter in wanted.items()
        ):
            return name
    classes = {key: type(module).__name__ for key, module in given.items()}
    raise ValueError(
        f"No stock pipeline takes exactly these text encoders {classes}; pass `stock_pipeline=` (one of "
        f"{sorted(STOCK_ROUTES)})."
    )


def _resolve_own_class_name(config: dict, class_name: str) -> dict:
    """Route 1's one private hook (`ConfigMixin._dict_from_json_file`): an export names this class as repository code
    (`["pipeline_dmdr", "FewStepDMDRPipeline"]`) so that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`
    finds it. Called on this class itself, the class is already here: load into it without running the repository's
    copy."""
    name = config.get("_class_name")
    if isinstance(name, list | tuple) and name[-1] == class_name:
        config["_class_name"] = class_name
    return config


def write_remote_code_form(folder, scheduler_class: type) -> None:
    """Point a saved folder's `model_index.json` at the repository's own code and copy that code in."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    model_index = json.loads(index_file.read_text(encoding="utf-8"))
    model_index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    if scheduler_class.__name__ == SCHEDULER_CLASS:
        model_index["scheduler"] = [SCHEDULER_MODULE, SCHEDULER_CLASS]
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        scheduler_file = Path(sys.modules[scheduler_class.__module__].__file__)
        if scheduler_file.resolve() != (folder / "scheduler" / f"{SCHEDULER_MODULE}.py").resolve():
            shutil.copyfile(scheduler_file, folder / "scheduler" / f"{SCHEDULER_MODULE}.py")
    index_file.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if Path(__file__).resolve() != (folder / f"{PIPELINE_MODULE}.py").resolve():
        shutil.copyfile(__file__, folder / f"{PIPELINE_MODULE}.py")
