"""The names of the files in an export folder, shared by the folder writer, the model card and the command line.

The code-file and class names are those `pipelines/pipeline_dmdr.py` writes into a full export's `model_index.json`
(`["pipeline_dmdr", "FewStepDMDRPipeline"]`, `["scheduling_dmdr", "DMDRScheduler"]`): read from there.
"""

from .pipelines.pipeline_dmdr import PIPELINE_CLASS, PIPELINE_MODULE, SCHEDULER_CLASS, SCHEDULER_MODULE  # noqa: F401


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "train_summary.json"
