"""The names of the files in an export folder, shared by the folder writer, the model card and the command line.

The code-file and class names are those of `pipelines/` (a test checks that they still are): `model_index.json` of a
full export names them as `["pipeline_dmdr", "FewStepDMDRPipeline"]` and `["scheduling_dmdr", "DMDRScheduler"]`.
"""

PIPELINE_MODULE, PIPELINE_CLASS = "pipeline_dmdr", "FewStepDMDRPipeline"
SCHEDULER_MODULE, SCHEDULER_CLASS = "scheduling_dmdr", "DMDRScheduler"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "train_summary.json"
