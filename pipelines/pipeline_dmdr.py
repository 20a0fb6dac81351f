# Copyright 2026 The diffusers-dmdr authors. Licensed under the Apache License, Version 2.0.
"""FewStepDMDRPipeline: text-to-image sampling with a DMDR few-step student (SDXL, SD1.5 and SD3 families).

This file is self-contained (torch, numpy, diffusers and transformers only) so that it can be copied verbatim into an
exported Hub folder as `pipeline_dmdr.py` and loaded by users who do not have `diffusers_dmdr` installed.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


logger = logging.get_logger(__name__)

# The T5 prompt length the SD3 students are trained with (the released DMDR scripts); the stock pipeline uses 256,
# and padding to another length changes the joint-attention context the student sees.
SD3_MAX_SEQUENCE_LENGTH = 128
# How an exported `model_index.json` names the scheduler for `DiffusionPipeline` (file `scheduler/scheduling_dmdr.py`).
SCHEDULER_MODULE, SCHEDULER_CLASS = "scheduling_dmdr", "DMDRScheduler"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> # An export of diffusers-dmdr ships this file; `trust_remote_code` lets diffusers run it.
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "org/sdxl-dmdr-4step", trust_remote_code=True, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> # The trained step count and no classifier-free guidance are the defaults.
        >>> image = pipe("a photo of a red fox in the snow").images[0]
        ```
"""


@dataclass
class FewStepDMDRPipelineOutput(BaseOutput):
    """
    Output of [`FewStepDMDRPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (or latents with `output_type="latent"`), `batch_size * num_images_per_prompt` of
            them.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class FewStepDMDRPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with a few-step student distilled by DMDR (https://huggingface.co/papers/2511.13649).

    The student samples with its own training sampler, the [`DMDRScheduler`]: at each student timestep the backbone's
    output becomes a clean prediction `x0`, which is re-noised to the next student timestep (with fresh noise, or
    deterministically for students trained with the ODE sampler); the last step returns `x0`. Given the same generator,
    the output equals the trainer's own N-step sampler.

    One class serves three families, told apart by their components: SDXL (`unet` with `text_time` conditioning, two
    CLIP encoders), SD1.5 (`unet`, one CLIP encoder) and SD3 (`transformer`, two CLIP encoders and T5). Prompts are
    encoded by the family's stock diffusers pipeline built around the same modules, so they are encoded exactly as the
    teacher encodes them.

    Args:
        vae ([`AutoencoderKL`]):
            The variational auto-encoder that decodes latents to images.
        text_encoder ([`~transformers.CLIPTextModel`] or [`~transformers.CLIPTextModelWithProjection`]):
            The first CLIP text encoder (with projection for SD3).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            The tokenizer of `text_encoder`.
        scheduler ([`DMDRScheduler`]):
            The student's sampler; its config holds the trained timesteps and the prediction type.
        unet ([`UNet2DConditionModel`], *optional*):
            The student backbone of the SDXL and SD1.5 families.
        transformer ([`SD3Transformer2DModel`], *optional*):
            The student backbone of the SD3 family.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`], *optional*):
            The second CLIP text encoder (SDXL, SD3).
        tokenizer_2 ([`~transformers.CLIPTokenizer`], *optional*):
            The tokenizer of `text_encoder_2`.
        text_encoder_3 ([`~transformers.T5EncoderModel`], *optional*):
            The T5 text encoder (SD3).
        tokenizer_3 ([`~transformers.T5TokenizerFast`], *optional*):
            The tokenizer of `text_encoder_3`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        scheduler: SchedulerMixin,
        unet: UNet2DConditionModel | None = None,
        transformer: SD3Transformer2DModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("Pass exactly one backbone: `unet` (SDXL, SD1.5) or `transformer` (SD3).")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            unet=unet,
            transformer=transformer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def _dict_from_json_file(cls, json_file):
        config = super()._dict_from_json_file(json_file)
        class_name = config.get("_class_name")
        # An export names this class as repository code (`["pipeline_dmdr", "FewStepDMDRPipeline"]`) so that
        # `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` finds it. Called on this class itself, the
        # class is already here: load into it without running the repository's copy.
        if isinstance(class_name, list | tuple) and class_name[-1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    @classmethod
    def load_config(cls, *args, **kwargs):
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        # Likewise the scheduler: an export names `scheduler/scheduling_dmdr.py`; when this file is installed as part
        # of a package, the same scheduler sits next to it and is used instead of the repository's copy. (Loaded as
        # repository code itself, this file leaves the entry alone: diffusers then asks for `trust_remote_code`.)
        installed = bool(__package__) and not __package__.startswith("diffusers_modules")
        if list(config.get("scheduler") or []) == [SCHEDULER_MODULE, SCHEDULER_CLASS] and installed:
            try:
                scheduler_module = importlib.import_module(f".{SCHEDULER_MODULE}", __package__)
            except ImportError:
                scheduler_module = None
            if scheduler_module is not None:
                config["scheduler"] = [scheduler_module.__name__, SCHEDULER_CLASS]
        return outputs

    # ------------------------------------------------------------------------------------------------------------
    # Family and prompt encoding
    # ------------------------------------------------------------------------------------------------------------
    @property
    def model_family(self) -> str:
        """`"sd3"`, `"sdxl"` or `"sd15"`, from the components."""
        if self.transformer is not None:
            return "sd3"
        return "sdxl" if self.text_encoder_2 is not None else "sd15"

    @property
    def backbone(self) -> torch.nn.Module:
        """The student backbone: `unet` or `transformer`."""
        return self.unet if self.unet is not None else self.transformer

    def _stock_pipeline(self) -> DiffusionPipeline:
        """The family's stock diffusers pipeline around this pipeline's own modules (nothing is copied)."""
        if self.model_family == "sd3":
            return StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=self.tokenizer_3,
            )
        if self.model_family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.scheduler,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        r"""
        Encode prompts with the family's stock `encode_prompt`, exactly as the teacher and the trainer encode them.

        Args:
            prompt (`str` or `list[str]`):
                The prompt or prompts to encode.
            device (`torch.device`):
                Where the embeddings go.
            num_images_per_prompt (`int`, defaults to 1):
                Copies of each prompt's embeddings.
            do_classifier_free_guidance (`bool`, defaults to `False`):
                Also encode `negative_prompt` (the empty prompt when `None`).
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from; used only with classifier-free guidance.
            max_sequence_length (`int`, defaults to 128):
                T5 prompt length (SD3 only).

        Returns:
            `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`; the pooled
            embeddings are `None` for SD1.5 and the negative ones `None` without guidance.
        """
        stock_pipeline = self._stock_pipeline()
        common = {
            "prompt": prompt,
            "device": device,
            "num_images_per_prompt": num_images_per_prompt,
            "do_classifier_free_guidance": do_classifier_free_guidance,
            "negative_prompt": negative_prompt,
        }
        if self.model_family == "sd3":
            return stock_pipeline.encode_prompt(
                prompt_2=None, prompt_3=None, max_sequence_length=max_sequence_length, **common
            )
        if self.model_family == "sdxl":
            return stock_pipeline.encode_prompt(**common)
        prompt_embeds, negative_prompt_embeds = stock_pipeline.encode_prompt(**common)
        return prompt_embeds, negative_prompt_embeds, None, None

    # ------------------------------------------------------------------------------------------------------------
    # Helpers of __call__
    # ------------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        num_inference_steps: int | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        if not isinstance(prompt, str | list):
            raise ValueError(f"`prompt` has to be a `str` or a `list[str]`, got {type(prompt)}.")
        multiple = self.vae_scale_factor * getattr(self.backbone.config, "patch_size", 1)
        if height % multiple or width % multiple:
            raise ValueError(f"`height` and `width` must be multiples of {multiple}, got {height} and {width}.")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
        unknown = [
            name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}: {unknown}."
            )

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pure Gaussian noise in float32, drawn exactly as the trainer draws its initial noise."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}: pass one per image.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif latents.shape != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        guidance_scale: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> FewStepDMDRPipelineOutput | tuple:
        r"""
        Generate images with the student's few-step sampler.

        Args:
            prompt (`str` or `list[str]`):
                The prompt or prompts to guide the image generation.
            negative_prompt (`str` or `list[str]`, *optional*):
                What to guide away from. Used only with classifier-free guidance (`guidance_scale > 1`); the student
                is trained to sample without it, so by default it is ignored with a warning.
            height (`int`, *optional*), width (`int`, *optional*):
                Image size in pixels; defaults to the backbone's `sample_size` times the VAE scale factor.
            num_inference_steps (`int`, *optional*):
                Sampling steps; defaults to the trained count. Another count works with a warning: the scheduler then
                interpolates the trained timesteps linearly, keeping the first and the last (see
                [`DMDRScheduler.grid_for`]).
            timesteps (`list[float]`, *optional*):
                Explicit timesteps in model units, noisiest first, instead of the trained grid.
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; values up to 1 disable guidance (the trained setting).
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Source of the initial noise and of the fresh noise of every re-noising step; the same generator gives
                the trainer's samples.
            latents (`torch.Tensor`, *optional*):
                Initial noise of shape `(batch_size * num_images_per_prompt, channels, height // 8, width // 8)`.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"`, or `"latent"` (float32 latents, not decoded).
            return_dict (`bool`, defaults to `True`):
                Return a [`FewStepDMDRPipelineOutput`] instead of a tuple.
            max_sequence_length (`int`, defaults to 128):
                T5 prompt length (SD3 only), the length the student was trained with.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*):
                Called after each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`; it may return
                a modified `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Tensors passed in `callback_kwargs`, among `latents`, `denoised` (the step's `x0`) and
                `prompt_embeds`; defaults to `["latents"]`.

        Examples:

        Returns:
            [`FewStepDMDRPipelineOutput`] or `tuple`: the images, as a dataclass or as a 1-tuple.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 0. Default height and width: the backbone's native size.
        default_size = self.backbone.config.sample_size * self.vae_scale_factor
        height = height or default_size
        width = width or default_size

        # 1. Check inputs
        self.check_inputs(prompt, height, width, num_inference_steps, callback_on_step_end_tensor_inputs)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        if negative_prompt is not None and not self.do_classifier_free_guidance:
            logger.warning(
                f"`negative_prompt` is ignored: classifier-free guidance is off (guidance_scale={guidance_scale}), as "
                "the student was trained. Pass guidance_scale > 1 to use it."
            )
            negative_prompt = None

        # 2. Encode the prompts
        device = self._execution_device
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length,
            )
        )
        condition = {"encoder_hidden_states": prompt_embeds}
        if self.model_family == "sd3":
            condition["pooled_projections"] = pooled_prompt_embeds
        elif self.model_family == "sdxl":
            # SDXL micro-conditioning: original size, top-left crop, target size (the trainer's square equivalent).
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt_embeds.dtype, device=device)
            condition["added_cond_kwargs"] = {
                "text_embeds": pooled_prompt_embeds,
                "time_ids": time_ids.repeat(prompt_embeds.shape[0], 1),
            }
        if self.do_classifier_free_guidance:
            condition["encoder_hidden_states"] = torch.cat([negative_prompt_embeds, prompt_embeds])
            if self.model_family == "sd3":
                condition["pooled_projections"] = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
            elif self.model_family == "sdxl":
                added = condition["added_cond_kwargs"]
                added["text_embeds"] = torch.cat([negative_pooled_prompt_embeds, added["text_embeds"]])
                added["time_ids"] = torch.cat([added["time_ids"], added["time_ids"]])

        # 3. The student's timesteps: the trained grid unless told otherwise
        self.scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        step_timesteps = self.scheduler.timesteps
        self._num_timesteps = len(step_timesteps)

        # 4. Initial noise. The loop keeps latents in float32 whatever the backbone's dtype, so that every noise draw
        #    matches the trainer's sampler (which also keeps its samples in float32).
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.backbone.config.in_channels,
            height,
            width,
            device,
            generator,
            latents,
        )

        # 5. Few-step sampling: predict x0, re-noise to the next student timestep
        denoised = latents
        with self.progress_bar(total=len(step_timesteps)) as progress_bar:
            for i, t in enumerate(step_timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
                model_input = model_input.to(self.backbone.dtype)
                timestep = t.expand(model_input.shape[0])
                if self.transformer is not None:
                    model_output = self.transformer(
                        hidden_states=model_input, timestep=timestep, return_dict=False, **condition
                    )[0]
                else:
                    model_output = self.unet(model_input, timestep, return_dict=False, **condition)[0]
                if self.do_classifier_free_guidance:
                    output_uncond, output_cond = model_output.chunk(2)
                    model_output = output_uncond + guidance_scale * (output_cond - output_uncond)

                step_output = self.scheduler.step(model_output, t, latents, generator=generator)
                latents, denoised = step_output.prev_sample, step_output.pred_original_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Decode
        if output_type == "latent":
            image = latents
        else:
            # An fp16 VAE that asks for it decodes in float32 (the SDXL VAE overflows in fp16).
            needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
            if needs_upcasting:
                self.vae.to(torch.float32)
            shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
            vae_latents = latents / self.vae.config.scaling_factor + shift_factor
            image = self.vae.decode(vae_latents.to(self.vae.dtype), return_dict=False)[0]
            if needs_upcasting:
                self.vae.to(torch.float16)
            image = self.image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FewStepDMDRPipelineOutput(images=image)
