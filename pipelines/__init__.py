"""Inference code of diffusers-dmdr, as self-contained single files (diffusers' single-file policy).

The files in this folder import only torch, numpy, diffusers and transformers: they are installed as
`diffusers_dmdr.pipelines` and copied verbatim into every exported Hub folder.
"""

from .pipeline_dmdr import FewStepDMDRPipeline, FewStepDMDRPipelineOutput
from .scheduling_dmdr import DMDRScheduler, DMDRSchedulerOutput


__all__ = ["DMDRScheduler", "DMDRSchedulerOutput", "FewStepDMDRPipeline", "FewStepDMDRPipelineOutput"]
