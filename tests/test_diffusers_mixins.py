"""diffusers' own scheduler and pipeline test suites, run against DMDRScheduler and FewStepDMDRPipeline.

The suites (`tests/schedulers/test_schedulers.py::SchedulerCommonTest`,
`tests/pipelines/test_pipelines_common.py::PipelineTesterMixin`) live in diffusers' source repository, not in its wheel
or sdist, so they cannot be installed offline: point `DIFFUSERS_SRC` at a diffusers checkout (and install
`parameterized` and `requests-mock`, which they import) and run `make test-upstream DIFFUSERS_SRC=/path/to/diffusers`.
Every defect these suites found has its own test in tests/test_scheduling_dmdr.py and tests/test_pipeline_dmdr.py,
which run in `make test`.

Checks that do not apply to a fixed-grid few-step sampler or to a pass-through pipeline are switched off below, each
with the reason.
"""

import os
import sys
import unittest

import pytest
import torch


DIFFUSERS_SRC = os.environ.get("DIFFUSERS_SRC")
if not DIFFUSERS_SRC or not os.path.isdir(os.path.join(DIFFUSERS_SRC, "tests", "schedulers")):
    pytest.skip(
        "diffusers' own test suites are not shipped in its wheel or sdist; run `make test-upstream "
        "DIFFUSERS_SRC=<diffusers checkout>` to run them against the scheduler and the pipeline",
        allow_module_level=True,
    )
sys.path.insert(0, DIFFUSERS_SRC)
# The checkout's `tests` package, not this project's test folder.
sys.modules.pop("tests", None)

from tests.pipelines.pipeline_params import TEXT_TO_IMAGE_BATCH_PARAMS, TEXT_TO_IMAGE_PARAMS  # noqa: E402
from tests.pipelines.test_pipelines_common import PipelineTesterMixin  # noqa: E402
from tests.schedulers.test_schedulers import SchedulerCommonTest  # noqa: E402

from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline  # noqa: E402
from diffusers_dmdr.testing import tiny_sdxl_components  # noqa: E402


class DMDRSchedulerCommonTest(SchedulerCommonTest):
    scheduler_classes = (DMDRScheduler,)
    # The suite's defaults step 50 times; this sampler's grid is the student's, so the checks run a 10-step trained
    # grid at its trained count (some checks index `timesteps[5]`).
    forward_default_kwargs = (("num_inference_steps", 10),)

    @property
    def default_num_inference_steps(self):
        return 10

    def get_scheduler_config(self, **kwargs):
        config = {"num_train_timesteps": 1000, "training_timesteps": [999.0 - 100.0 * k for k in range(10)]}
        config.update(**kwargs)
        return config

    def test_trained_betas(self):
        # The upstream check passes two betas with `num_train_timesteps=1000`; this scheduler requires one beta per
        # training timestep (tests/test_scheduling_dmdr.py::test_trained_betas_replace_the_named_schedule).
        scheduler = DMDRScheduler(
            **self.get_scheduler_config(), trained_betas=torch.linspace(1e-4, 0.02, 1000).numpy()
        )
        reloaded = DMDRScheduler.from_config(scheduler.config)
        torch.testing.assert_close(reloaded.alphas_cumprod, scheduler.alphas_cumprod)

    @pytest.mark.skip(
        reason="no stock scheduler is a drop-in replacement (`_compatibles` is empty): LCMScheduler / FlowMatch "
        "schedulers reproduce this sampler only with the call arguments of `stock_scheduler_recipe()`; the upstream "
        "check also raises UnboundLocalError on an empty compatibles list"
    )
    def test_compatibles(self):
        pass

    @pytest.mark.skip(reason="needs the Hub (push_to_hub), unreachable offline")
    def test_push_to_hub(self):
        pass

    @pytest.mark.skip(reason="needs the Hub (push_to_hub), unreachable offline")
    def test_push_to_hub_in_organization(self):
        pass


class FewStepDMDRPipelineTesterTest(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = FewStepDMDRPipeline
    params = TEXT_TO_IMAGE_PARAMS
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS
    # The student samples without classifier-free guidance (`guidance_scale=0` by default); `test_cfg` compares
    # guidance on/off and applies through the stock pipeline.
    test_attention_slicing = False
    test_xformers_attention = False

    def get_dummy_components(self):
        expected, _ = FewStepDMDRPipeline._get_signature_keys(FewStepDMDRPipeline)
        components = {name: module for name, module in tiny_sdxl_components(0).items() if name in expected}
        components["scheduler"] = DMDRScheduler(training_timesteps=[999.0, 749.0, 499.0, 249.0])
        # The other families' components are absent, as diffusers' tests pass absent optional components.
        return {name: components.get(name) for name in expected}

    def get_dummy_inputs(self, device, seed=0):
        generator = torch.Generator("cpu").manual_seed(seed)
        return {"prompt": "a red cat", "generator": generator, "num_inference_steps": 4, "output_type": "np"}

    @pytest.mark.skip(
        reason="the upstream check names `encode_prompt`'s outputs from its source, found as "
        "`diffusers.pipelines.<class name>` (`ReturnNameVisitor.get_ast_tree`), where no pipeline outside diffusers "
        "is (AttributeError), and this `encode_prompt` returns the stock pipeline's tuple, whose names differ by "
        "family. The scenario it checks (encode with the text encoders alone, sample from those embeddings without "
        "them, same images) runs in `make test`: "
        "tests/test_pipeline_dmdr.py::test_embeddings_encoded_in_isolation_sample_as_the_full_pipeline"
    )
    def test_encode_prompt_works_in_isolation(self):
        pass

    @pytest.mark.skip(
        reason="the optional components are optional across families (SD1.5 has no second text encoder, SD3 no "
        "UNet); an SDXL student with all of them set to None has no second text encoder to run"
    )
    def test_save_load_optional_components(self):
        pass
