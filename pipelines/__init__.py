"""Inference code of diffusers-dmdr, as self-contained single files (diffusers' single-file policy).

The files in this folder import only torch, numpy, diffusers and transformers: they are installed as
`diffusers_dmdr.pipelines` and copied verbatim into every exported Hub folder.
"""

from .scheduling_dmdr import DMDRScheduler, DMDRSchedulerOutput


__all__ = ["DMDRScheduler", "DMDRSchedulerOutput", "FewStepDMDRPipeline", "FewStepDMDRPipelineOutput"]


def __getattr__(name: str):
    # The pipeline imports diffusers' stock pipelines and transformers' text encoders (seconds): only when asked for,
    # so that the trainer and the preflight checks, which need the scheduler alone, stay quick to import.
    if name in ("FewStepDMDRPipeline", "FewStepDMDRPipelineOutput"):
        from . import pipeline_dmdr

        return getattr(pipeline_dmdr, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
