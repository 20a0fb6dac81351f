#!/usr/bin/env python
"""Distil a diffusers text-to-image teacher into a few-step student with DMDR.

    accelerate launch examples/train_dmdr/train.py --config examples/train_dmdr/configs/sdxl_4step.yaml \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --train_prompts prompts.txt

The program is `diffusers_dmdr.train` (also `accelerate launch -m diffusers_dmdr.train ...` or `dmdr-train` from an
installed wheel); this file runs it from a checkout.
"""

import sys

from diffusers_dmdr.train import main, parse_and_check


__all__ = ["main", "parse_and_check"]


if __name__ == "__main__":
    main(sys.argv[1:])
