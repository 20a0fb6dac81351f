#!/usr/bin/env python
"""What an 8-bit teacher costs on the digit-pairs testbed (issue 23): the 50-step CFG teacher with its U-Net loaded
as `--base_quantization` loads it, against the same teacher unquantized, on the same noise.

The digits teacher is a stock `StableDiffusionXLPipeline` folder, so the quantized variant loads exactly as a
training run loads its frozen base: `StableDiffusionXLPipeline.from_pretrained(teacher, quantization_config=...)`
with the project's own `adapters.teacher_quantization_config` (diffusers' `PipelineQuantizationConfig`, the U-Net
only: `nn.Linear` weights to torchao int8 weight-only; text encoders, VAE, convolutions, norms unchanged). Both
variants sample the held-out pairs with per-sample seeds `seed + i` (`digits.sample_pairs`) and are scored by the
testbed's evaluation classifier against the held-out real pairs (`digits.evaluate_pairs`: pair accuracy, FD,
precision, recall, diversity). Beyond the two metric sets, the paired comparison says how much the quantization moves
each sample: the fraction of samples whose two digits the classifier reads the same in both variants, and the mean
absolute pixel difference of same-noise images.

    OMP_NUM_THREADS=1 python benchmarks/quantized_teacher_digits.py --num_per_pair 32 --output quant_digits.json

bitsandbytes schemes need CUDA (`--variants none,bnb_int8,bnb_nf4 --device cuda`); on the CPU `torchao_int8` runs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusers_dmdr.adapters import teacher_quantization_config
from diffusers_dmdr.digits import (
    HELD_OUT_PAIRS,
    TEACHER_GUIDANCE_SCALE,
    TEACHER_NUM_INFERENCE_STEPS,
    build_testbed,
    evaluate_pairs,
    load_eval_classifier,
    load_real_pairs,
    predict_pairs,
    sample_pairs,
)
from diffusers_dmdr.memory_plan import frozen_backbone_bytes


METRICS = ("pair_accuracy", "accuracy", "fd", "precision", "recall", "diversity")


def load_teacher(teacher_dir: Path, base_quantization: str, device: str):
    from diffusers import StableDiffusionXLPipeline

    quantization = teacher_quantization_config(base_quantization, "unet", torch.float32)
    extra = {} if quantization is None else {"quantization_config": quantization}
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(teacher_dir), dtype=torch.float32, **extra)
    if base_quantization == "none" or not base_quantization.startswith("bnb_"):
        pipeline.to(device)
    else:  # bitsandbytes placed the U-Net on the GPU already
        for name in ("vae", "text_encoder", "text_encoder_2"):
            getattr(pipeline, name).to(device)
    return pipeline


def unet_weight_bytes(unet: torch.nn.Module) -> int:
    """Bytes the loaded U-Net holds: every parameter and buffer, a quantized weight by its component tensors."""
    total = 0
    for tensor in list(unet.parameters()) + list(unet.buffers()):
        names = getattr(tensor, "tensor_data_names", None)
        parts = [getattr(tensor, name) for name in names] if names else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="none,torchao_int8", help="comma-separated --base_quantization values")
    parser.add_argument("--num_per_pair", type=int, default=32, help="samples per held-out pair (20 pairs)")
    parser.add_argument("--seed", type=int, default=1000, help="first noise seed (the demo's evaluation seed)")
    parser.add_argument("--steps", type=int, default=TEACHER_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=TEACHER_GUIDANCE_SCALE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    testbed = build_testbed(args.cache_dir, progress=False)
    classifier = load_eval_classifier(testbed.eval_weights)
    real_images = load_real_pairs()
    results, images = {}, {}
    for variant in args.variants.split(","):
        pipeline = load_teacher(testbed.teacher_dir, variant, args.device)
        start = time.perf_counter()
        samples = sample_pairs(
            pipeline,
            HELD_OUT_PAIRS,
            num_per_pair=args.num_per_pair,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            progress=False,
        )
        metrics = evaluate_pairs(classifier, samples.images, samples.digits, samples.prompts, real_images)
        scheme = {"none": "none", "torchao_int8": "int8", "bnb_int8": "int8", "bnb_nf4": "nf4"}[variant]
        with torch.device("meta"):
            from diffusers import UNet2DConditionModel

            meta_unet = UNet2DConditionModel.from_config(pipeline.unet.config).requires_grad_(False)
        results[variant] = {
            **{name: metrics[name] for name in METRICS},
            "num_samples": len(samples.images),
            "seconds": time.perf_counter() - start,
            "samples_per_second": samples.samples_per_second,
            "unet_bytes_loaded": unet_weight_bytes(pipeline.unet),
            "unet_bytes_planned": frozen_backbone_bytes(meta_unet, scheme)[0],
            "linear_weight_types": sorted(
                {type(m.weight).__name__ for m in pipeline.unet.modules() if isinstance(m, torch.nn.Linear)}
            ),
        }
        images[variant] = samples.images
        print(f"{variant}: {json.dumps(results[variant])}", file=sys.stderr)  # noqa: T201
    reference = args.variants.split(",")[0]
    reference_reads = predict_pairs(classifier, images[reference])
    for variant in list(results)[1:]:
        reads = predict_pairs(classifier, images[variant])
        results[variant]["same_reading_as_" + reference] = float((reads == reference_reads).all(dim=1).double().mean())
        results[variant]["mean_abs_pixel_difference_to_" + reference] = float(
            (images[variant] - images[reference]).abs().mean()
        )
    report = {
        "testbed": testbed.root.name,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "num_per_pair": args.num_per_pair,
        "torch_num_threads": torch.get_num_threads(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)  # noqa: T201
    return report


if __name__ == "__main__":
    main()
