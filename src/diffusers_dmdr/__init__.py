"""diffusers-dmdr: distil a multi-step diffusers text-to-image model into a 1-8 step student with DMDR."""

__version__ = "0.1.0.dev0"
