#!/usr/bin/env python
"""GPU memory and FLOPs of a whole DMDR iteration at real size, estimated on this CPU with fake tensors (issue 23).

For each released model at its recipe (`examples/train_dmdr/configs`: 4 student steps, LoRA rank 64 / fake 32,
8-bit AdamW, gradient checkpointing, cached prompt embeddings, CLIP (DFN5B ViT-H/14) + HPSv2.1 (ViT-H/14) rewards,
1024 px, batch 1 per GPU), `diffusers_dmdr.memory_estimate.estimate_iteration` runs the iteration on fake tensors
and reports per-phase peaks, persistent bytes, the margin, the total and the FLOPs overhead. Results are cached in
`docs/iteration_memory.json` (keyed by configuration), and `docs/benchmarks.md` gets the tables between its
`iteration-memory` markers.

    python benchmarks/iteration_memory.py                          # every row (~1 h on one busy core)
    python benchmarks/iteration_memory.py --rows sdxl-full sdxl-tiny
    python benchmarks/iteration_memory.py --calibration            # the five H200 cases at full size
    python benchmarks/iteration_memory.py --render                 # re-write docs/benchmarks.md from the cache
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "docs" / "iteration_memory.json"
PUBLISHED_TABLE = ROOT / "src" / "diffusers_dmdr" / "published_estimates.json"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- iteration-memory:begin -->", "<!-- iteration-memory:end -->"
COMMAND = "python benchmarks/iteration_memory.py"


def rows():
    """(row id, model, MemoryOptions, target GiB, what the issue asks) for every row of the targets table."""
    from diffusers_dmdr.memory_estimate import MemoryOptions as O

    ckpt_full, ckpt_tiny = O(reward_decode="full"), O(reward_decode="tiny")
    full_ckpt_cached = O(reward_decode="full_checkpointed", cache_reward_text_features=True)
    full_ckpt_tiled = O(
        reward_decode="full_checkpointed", reward_decode_tile_size=512, cache_reward_text_features=True
    )
    # The quantized-base rows: tiny decode and cached reward text features under an int8 or NF4 frozen base.
    tiny_cached_int8, tiny_cached_nf4 = (
        O(reward_decode="tiny", cache_reward_text_features=True, quantized_base=scheme) for scheme in ("int8", "nf4")
    )
    return [
        ("sdxl-full", "sdxl", ckpt_full, 16, "SDXL 4-step LoRA, DFN5B + HPSv2.1, full VAE decode"),
        ("sdxl-full-ckpt", "sdxl", O(reward_decode="full_checkpointed"), 16, "same, checkpointed VAE decode"),
        ("sdxl-full-ckpt-cached", "sdxl", full_ckpt_cached, 16, "same, checkpointed decode, text features cached"),
        ("sdxl-full-ckpt-tiled", "sdxl", full_ckpt_tiled, 16, "same, checkpointed decode in 512 px tiles"),
        ("sdxl-tiny", "sdxl", ckpt_tiny, 12, "same with a tiny autoencoder for the reward decode"),
        (
            "sdxl-tiny-cached",
            "sdxl",
            O(reward_decode="tiny", cache_reward_text_features=True),
            12,
            "same, reward text features cached",
        ),
        (
            "sdxl-tiny-cached-offload-seq",
            "sdxl",
            O(reward_decode="tiny", cache_reward_text_features=True, sequential_reward_backward=True),
            12,
            "same, reward towers offloaded, sequential reward backward",
        ),
        ("sd35-full", "sd35-large", ckpt_full, 32, "SD3.5-Large 4-step LoRA, bf16 base"),
        ("sd35-full-ckpt-cached", "sd35-large", full_ckpt_cached, 32, "SD3.5-Large, bf16 base, checkpointed decode"),
        ("sd35-full-ckpt-tiled", "sd35-large", full_ckpt_tiled, 32, "SD3.5-Large, bf16, checkpointed, 512 px tiles"),
        ("sd35-tiny", "sd35-large", ckpt_tiny, 32, "SD3.5-Large, bf16 base, tiny decode"),
        (
            "sd35-tiny-int8",
            "sd35-large",
            tiny_cached_int8,
            24,
            "SD3.5-Large, quantized base (int8)",
        ),
        (
            "sd35-tiny-nf4",
            "sd35-large",
            tiny_cached_nf4,
            24,
            "SD3.5-Large, quantized base (NF4)",
        ),
        ("flux1-full", "flux1-dev", ckpt_full, 48, "FLUX.1 [dev] 4-step LoRA, bf16 base"),
        ("flux1-tiny", "flux1-dev", ckpt_tiny, 48, "FLUX.1 [dev], bf16 base, tiny decode"),
        (
            "flux1-tiny-nf4",
            "flux1-dev",
            tiny_cached_nf4,
            24,
            "FLUX.1 [dev], quantized base (NF4)",
        ),
        ("klein-full", "flux2-klein-4b", ckpt_full, 16, "FLUX.2 [klein] base 4B"),
        ("klein-full-ckpt-cached", "flux2-klein-4b", full_ckpt_cached, 16, "FLUX.2 [klein] 4B, checkpointed decode"),
        (
            "klein-full-ckpt-tiled",
            "flux2-klein-4b",
            full_ckpt_tiled,
            16,
            "FLUX.2 [klein] 4B, checkpointed, 512 px tiles",
        ),
        ("klein-tiny", "flux2-klein-4b", ckpt_tiny, 16, "FLUX.2 [klein] base 4B, tiny decode"),
        (
            "qwen-tiny-int8",
            "qwen-image",
            tiny_cached_int8,
            32,
            "Qwen-Image 20B 4-step LoRA, int8 base",
        ),
        (
            "qwen-tiny-nf4",
            "qwen-image",
            tiny_cached_nf4,
            32,
            "Qwen-Image 20B 4-step LoRA, NF4 base",
        ),
        ("zimage-full", "z-image", ckpt_full, 24, "Z-Image 6B"),
        ("zimage-full-ckpt-cached", "z-image", full_ckpt_cached, 24, "Z-Image 6B, checkpointed decode"),
        ("zimage-full-ckpt-tiled", "z-image", full_ckpt_tiled, 24, "Z-Image 6B, checkpointed, 512 px tiles"),
        ("zimage-tiny", "z-image", ckpt_tiny, 24, "Z-Image 6B, tiny decode"),
        ("wan21-full", "wan21-t2v-1.3b", ckpt_full, 80, "Wan 2.1 T2V 1.3B, 480 x 832 x 81, five scored frames"),
        ("wan21-stage1", "wan21-t2v-1.3b", O(reward_decode="none"), 80, "Wan 2.1 T2V 1.3B, stage 1 (no reward)"),
    ]


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def save_cache(cache: dict) -> None:
    CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


def run_rows(selected: list[str], count_flops: bool = True) -> None:
    from diffusers_dmdr.memory_estimate import options_estimate, published_spec

    cache = load_cache()
    estimates = cache.setdefault("estimates", {})
    results = cache.setdefault("rows", {})
    for row_id, model, options, _, _ in rows():
        if selected and row_id not in selected:
            continue
        start = time.time()
        estimate = options_estimate(published_spec(model), options, cache=estimates, count_flops=count_flops)
        results[row_id] = estimate.to_dict()
        save_cache(cache)
        print(
            f"{row_id}: {estimate.total_bytes / 2**30:.2f} GiB, FLOPs overhead {estimate.flops_overhead:.3f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )


def run_persistent() -> None:
    """Every row's persistent bytes (exact arithmetic on meta models, seconds): shown where a fake run is pending."""
    from diffusers_dmdr.memory_estimate import persistent_bytes, published_spec

    cache = load_cache()
    for row_id, model, options, _, _ in rows():
        cache.setdefault("persistent", {})[row_id] = persistent_bytes(published_spec(model, options=options))
    save_cache(cache)


def run_calibration() -> None:
    from diffusers_dmdr.memory_estimate import H200_ACTIVATION_GIB, calibration_case

    cache = load_cache()
    for case, measured in H200_ACTIVATION_GIB.items():
        start = time.time()
        estimate = calibration_case(case) / 2**30
        cache.setdefault("calibration", {})[case] = {
            "estimate_gib": estimate,
            "h200_gib": measured,
            "seconds": time.time() - start,
        }
        save_cache(cache)
        print(f"{case}: {estimate:.3f} GiB, H200 {measured:.3f} GiB, ratio {estimate / measured:.3f}", flush=True)


# The scaled estimate's check: full estimates of the SDXL recipe at another resolution and batch, against the
# 1024 px / batch 1 row scaled by pixels x batch (what the preflight prints for a published backbone, `fast_estimate`).
FIT_CHECKS = {
    "sdxl-tiny-768px": ("sdxl", "sdxl-tiny", dict(resolution=768)),
    "sdxl-tiny-batch2": ("sdxl", "sdxl-tiny", dict(batch_size=2)),
    "sdxl-full-ckpt-768px": ("sdxl", "sdxl-full-ckpt", dict(resolution=768)),
}


def write_published_table() -> None:
    """The preflight's table (`memory_estimate.PUBLISHED_ESTIMATES_FILE`): every estimated row's phase peaks, keyed
    by architecture and activation options (a quantized row's phases hold a dequantized layer: left out)."""
    from diffusers_dmdr.memory_estimate import (
        architecture_key,
        build_backbone,
        build_reward_decoder,
        published_spec,
        run_pixels,
    )

    cache, table = load_cache(), {}
    for row_id, model, options, _, _ in rows():
        values = cache.get("rows", {}).get(row_id)
        if values is None or options.quantized_base != "none":
            continue
        # The key holds the activation options (`architecture_key`: text caching only where the towers stream).
        spec = published_spec(model, options=options)
        key = architecture_key(spec, build_backbone(spec), build_reward_decoder(spec))
        table[key] = {"model": model, "row": row_id, "phases": values["phases"], "pixels": run_pixels(spec)}
    PUBLISHED_TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def run_fit_checks() -> None:
    from dataclasses import replace

    from diffusers_dmdr.memory_estimate import estimate_iteration, published_spec, scaled_estimate

    cache = load_cache()
    options = {row_id: row_options for row_id, _, row_options, _, _ in rows()}
    for name, (model, row_id, changes) in FIT_CHECKS.items():
        start = time.time()
        spec = replace(published_spec(model, options=options[row_id]), **changes)
        entry = cache.setdefault("fit_check", {}).setdefault(name, {})
        if "full_total" not in entry:  # the full estimate is kept; the scaled one follows the current rule
            full = estimate_iteration(spec, count_flops=False)
            entry.update(full_total=full.total_bytes, full_phases=full.phases, seconds=time.time() - start)
        scaled = scaled_estimate(spec)
        entry.update(scaled_total=scaled.total_bytes, scaled_phases=scaled.phases)
        save_cache(cache)
        print(
            f"{name}: full {entry['full_total'] / 2**30:.2f} GiB, scaled {scaled.total_bytes / 2**30:.2f}", flush=True
        )


def run_decode_tiling() -> None:
    """The bare SDXL VAE decode + backward to the latent at 1024 px, checkpointed, whole and in 512 px tiles (the
    figure that decided `--reward_vae_tile_size`)."""
    from diffusers_dmdr.memory_estimate import SDXL_VAE, _meta, activation_peak, fake_tensors, materialize
    from diffusers_dmdr.reward_decode import enable_reward_decode_checkpointing, reward_decode_tiling

    cache = load_cache()
    for tile_size in (None, 512):
        vae = _meta("diffusers", "AutoencoderKL", SDXL_VAE, torch.bfloat16)
        enable_reward_decode_checkpointing(vae)
        with fake_tensors():
            materialize(vae)
            latents = torch.randn(1, 4, 128, 128, dtype=torch.bfloat16).requires_grad_(True)

            def run(vae=vae, latents=latents, tile_size=tile_size):
                with reward_decode_tiling(vae, tile_size):
                    vae.decode(latents).sample.float().mean().backward()

            peak, _ = activation_peak(run)
        cache.setdefault("decode_tiling", {})[str(tile_size)] = peak
        print(f"checkpointed SDXL decode, tiles {tile_size}: {peak / 2**30:.3f} GiB", flush=True)
    save_cache(cache)


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def render() -> str:
    from diffusers_dmdr.memory_estimate import ACTIVATION_MARGIN_FRACTION, CUDA_CONTEXT_BYTES, IterationEstimate

    cache = load_cache()
    lines = [
        BEGIN,
        "",
        "## Real-scale memory and FLOPs of a whole DMDR iteration (fake tensors on this CPU)",
        "",
        f"Produced by `{COMMAND}` (results cached in `docs/iteration_memory.json`; `--render` rewrites this "
        "section; the calibration table by `--calibration`). Method: `src/diffusers_dmdr/memory_estimate.py`.",
        "",
        "Each row runs one whole DMDR iteration of the released recipe on fake tensors: the real-size backbone, "
        "autoencoder and reward towers are built on the meta device from their published configs and "
        "`to_empty`-ed inside a `FakeTensorMode`, and every storage an op creates is counted as CUDA's caching "
        "allocator would see it (rounded to 512 bytes, live until freed; views and in-place results are not new "
        "memory). The phases are the algorithm's passes (DESIGN.md section 3): the backward simulation (the "
        "4-step student sampler without grad), the fake-score update (forward + backward + step), and the "
        "generator update (student forward with grad; real score with its CFG batch, or one pass at a guidance "
        "embedding for FLUX.1 [dev]; fake score without grad; the reward decode and both reward towers with "
        "their backward; the step). Persistent bytes (frozen weights, fp32 LoRA parameters, AdamW8bit states) "
        "use `memory_plan`'s exact arithmetic; the total is persistent + the largest phase peak + the margin.",
        "",
        "Assumptions, all from the recipes (`examples/train_dmdr/configs`): 1024 px, batch 1 per GPU, 4 student "
        "steps, student LoRA rank 64 / fake rank 32 on the family's targets, bf16 frozen weights under bf16 "
        "autocast (CUDA autocast's float32 `group_norm` / `layer_norm` emulated) except the reward decode, which "
        "runs in the autoencoder's bf16 with autocast off as the trainer does, 8-bit AdamW, gradient "
        "checkpointing of the backbone, cached prompt embeddings (text encoders off the GPU; the SDXL recipe "
        "does not set `--cache_prompt_embeds`: add it, its two encoders are another 1.6 GiB), two rewards "
        "(DFN5B CLIP and HPSv2.1, both open_clip ViT-H/14 at 224 px, built as transformers' CLIP classes of the "
        "same shapes) with their text towers on the GPU unless a row says the text features are cached. "
        "Conditioning lengths: SDXL 77 tokens, SD3.5 77 + 128, the others 512 (the families' padding).",
        "",
        "Every option is a trainer flag: `ckpt` `--gradient_checkpointing`; `decode full_checkpointed` "
        "`--reward_vae_gradient_checkpointing`; `512 px tiles` `--reward_vae_tile_size 512`; `decode tiny` "
        "`--reward_vae_model_name_or_path` (a TAESD-shaped `AutoencoderTiny` with the family's latent channels); "
        "`text features cached` `--cache_reward_text_features` (text towers deleted after one pass over the "
        "prompts); `towers offloaded, sequential backward` each reward's `offload=true` (weights on the host, "
        "streamed per call) with `--sequential_reward_backward` (each reward's backward right after it scores, so "
        "one tower's streamed weights and activations are on the GPU at a time; the host-to-device copies are "
        "counted); `int8 base` / `nf4 base` `--base_quantization bnb_int8` / `bnb_nf4` (the quantized frozen "
        "base; its bytes are the backends' storage arithmetic for `nn.Linear` weights plus one dequantized layer, "
        "activations those of the bf16 base).",
    ]
    calibration = cache.get("calibration", {})
    if calibration:
        lines += [
            "",
            "### Calibration: five H200 measurements (bf16, 1024 px, batch 1)",
            "",
            "| case | estimate (GiB) | H200 measured (GiB) | ratio |",
            "|---|---|---|---|",
        ]
        for case, values in calibration.items():
            ratio = values["estimate_gib"] / values["h200_gib"]
            lines.append(f"| {case} | {values['estimate_gib']:.3f} | {values['h200_gib']:.3f} | {ratio:.3f} |")
    lines += [
        "",
        "### Targets (per GPU, batch 1, 1024 px, margin included)",
        "",
        "| run | options | persistent | simulation | fake update | generator update | margin | **total** "
        "| target | met? | FLOPs/iter (PFLOP) | FLOPs overhead (iter / gen) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row_id, _model, options, target, title in rows():
        values = cache.get("rows", {}).get(row_id)
        if values is None:
            persistent = cache.get("persistent", {}).get(row_id)
            known = "not run"
            verdict = ""
            if persistent is not None:
                known = f"{gib(sum(persistent.values()))} (activations not run)"
                if sum(persistent.values()) / 2**30 > target:
                    verdict = f"no: weights alone +{sum(persistent.values()) / 2**30 - target:.1f} GiB"
            only = f" *(estimated only: {', '.join(options.estimated_only)})*" if options.estimated_only else ""
            lines.append(
                f"| {title} | {options.describe()}{only} | {known} | | | | | | {target} GiB | {verdict} | | |"
            )
            continue
        estimate = IterationEstimate.from_dict(values)
        phases = list(estimate.phases.values())
        total = estimate.total_bytes / 2**30
        verdict = "yes" if total <= target else f"no (+{total - target:.1f} GiB)"
        flops = "not counted | not counted"
        if estimate.required_flops:
            flops = (
                f"{estimate.total_flops / 1e15:.1f} | {estimate.flops_overhead:.3f} / "
                f"{estimate.generator_flops_overhead:.3f}"
            )
        only = f" *(estimated only: {', '.join(options.estimated_only)})*" if options.estimated_only else ""
        lines.append(
            f"| {title} | {options.describe()}{only} | {gib(estimate.persistent_bytes)} | {gib(phases[0])} | "
            f"{gib(phases[1])} | {gib(phases[2])} | {gib(estimate.margin_bytes)} | **{total:.2f}** | {target} GiB | "
            f"{verdict} | {flops} |"
        )
    lines += [
        "",
        f"Margin: {CUDA_CONTEXT_BYTES / 2**30:.1f} GiB (CUDA context, cuBLAS workspaces) + "
        f"{ACTIVATION_MARGIN_FRACTION:.0%} of the largest phase peak (allocator fragmentation, and the "
        "counter's under-estimate, 0.92-1.00 of the H200 figures).",
        "",
    ]
    details = []
    for row_id, _model, options, _target, title in rows():
        values = cache.get("rows", {}).get(row_id)
        if values is None:
            continue
        estimate = IterationEstimate.from_dict(values)
        persistent = ", ".join(f"{name} {gib(value)}" for name, value in estimate.persistent.items())
        details.append(f"- **{title}** ({options.describe()}): {persistent} GiB.")
    if details:
        lines += ["### Persistent bytes per row (GiB)", "", *details, ""]
    fit = cache.get("fit_check", {})
    if fit:
        lines += [
            "### The preflight's scaled estimate against full estimates",
            "",
            "Without `--max_memory_gib` the preflight prints, in seconds, the cached full estimate of the run's exact "
            "configuration or else the published row of the same backbone, autoencoder, reward count and options "
            "with its activation peaks scaled by `batch x pixels / 1024^2` and its persistent bytes exact "
            "(`memory_estimate.fast_estimate`, table `src/diffusers_dmdr/published_estimates.json`). Its distance "
            f"from the full estimate (`{COMMAND} --fit-check`):",
            "",
            "| run | full estimate (GiB) | scaled (GiB) | scaled / full |",
            "|---|---|---|---|",
        ]
        for name, values in fit.items():
            ratio = values["scaled_total"] / values["full_total"]
            lines.append(f"| {name} | {gib(values['full_total'])} | {gib(values['scaled_total'])} | {ratio:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs() -> None:
    text = DOCS.read_text()
    section = render()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    global CACHE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=[], help="row ids to (re)estimate; default: every row")
    parser.add_argument("--calibration", action="store_true", help="run the five H200 calibration cases")
    parser.add_argument("--persistent", action="store_true", help="every row's persistent bytes only (seconds)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md from the cache")
    parser.add_argument(
        "--fit-check", action="store_true", help="full estimates at other sizes against the preflight's scaled ones"
    )
    parser.add_argument("--decode-tiling", action="store_true", help="the checkpointed SDXL decode, whole and tiled")
    parser.add_argument(
        "--no-flops", action="store_true", help="memory only: skip the FLOP counter and its unit passes (~2x faster)"
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help="results file (default docs/iteration_memory.json)")
    args = parser.parse_args(argv)
    known = {row[0] for row in rows()}
    unknown = sorted(set(args.rows) - known)
    if unknown:
        print(f"Unknown rows {unknown}; choose from {sorted(known)}.", file=sys.stderr)
        return 2
    CACHE = args.cache
    torch.set_num_threads(1)
    if args.calibration:
        run_calibration()
    elif args.persistent:
        run_persistent()
    elif args.fit_check:
        run_fit_checks()
    elif args.decode_tiling:
        run_decode_tiling()
    elif not args.render:
        run_rows(args.rows, count_flops=not args.no_flops)
    if not (args.fit_check or args.decode_tiling):
        write_published_table()
    write_docs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
