"""The shipped DMDR recipes (YAML), installed as the data package `diffusers_dmdr.recipes`: `--config sdxl_4step`
reads `sdxl_4step.yaml` from here (see `diffusers_dmdr.config.recipe_folder`)."""
