"""Packaging for diffusers-dmdr.

Install torch first, pinned (see README), so that pip never resolves a CUDA build on a CPU machine.
"""

from setuptools import find_packages, setup


INSTALL_REQUIRES = [
    "torch>=2.4",
    "diffusers>=0.42.1",
    "transformers>=5.0",
    "accelerate>=1.10",
    "peft>=0.17",
    "datasets>=4.0",
    "huggingface_hub>=1.0,<3",
    # The model card template (torch already depends on it).
    "Jinja2>=3.1,<4",
    "safetensors>=0.4",
    "pyyaml",
    "tqdm",
    "Pillow",
    "tensorboard",
]

EXTRAS = {
    "bnb": ["bitsandbytes>=0.50"],
    # `--base_quantization torchao_int8`: the frozen base in int8 through diffusers' TorchAoConfig (runs on the CPU
    # too); diffusers' torchao backend needs torchao >= 0.15. The bitsandbytes schemes use the `bnb` extra (CUDA).
    "quant": ["torchao>=0.15"],
    # open_clip needs torchvision: install the torchvision build that matches your torch (README, "Rewards").
    "rewards": ["open_clip_torch>=3.0"],
    "demo": ["scikit-learn>=1.3", "matplotlib>=3.7", "scipy"],
    "quality": ["ruff>=0.6"],
    "test": ["pytest>=8", "pytest-timeout"],
}
EXTRAS["dev"] = sorted({req for key in ("bnb", "demo", "quant", "quality", "test") for req in EXTRAS[key]})

setup(
    name="diffusers-dmdr",
    version="0.1.0.dev0",
    description="DMDR: distribution matching distillation with reinforcement learning, for diffusers text-to-image models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    url="https://github.com/diffusers-dmdr/diffusers-dmdr",
    project_urls={
        "Source": "https://github.com/diffusers-dmdr/diffusers-dmdr",
        "Issues": "https://github.com/diffusers-dmdr/diffusers-dmdr/issues",
        "Paper": "https://huggingface.co/papers/2511.13649",
    },
    # The recipes ship in the wheel as `diffusers_dmdr.recipes`, so that `--config sdxl_4step` names one.
    package_dir={
        "": "src",
        "diffusers_dmdr.pipelines": "pipelines",
        "diffusers_dmdr.recipes": "examples/train_dmdr/configs",
    },
    packages=find_packages("src") + ["diffusers_dmdr.pipelines", "diffusers_dmdr.recipes"],
    package_data={"diffusers_dmdr": ["templates/*.jinja", "published_estimates.json"], "diffusers_dmdr.recipes": ["*.yaml"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["dmdr-export=diffusers_dmdr.export_cli:main", "dmdr-train=diffusers_dmdr.train:cli"]
    },
)
