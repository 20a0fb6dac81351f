"""Progress-dependent schedules and samplers of DMDR: DynaRS, DynaDG, CFG jitter (student grids: the scheduler's
`ddpm_student_grid` and `shifted_flow_grid`).

Pure functions. Random draws take an explicit `numpy.random.Generator` so that a run is a function of its seed and
step counter (exact resume needs no RNG state in the checkpoint).
"""

import math

import numpy as np
import torch


# DDPM timesteps live in [0, 999]; flow noise levels are kept away from 0 where x0 = x_t - t v degenerates to x_t.
MIN_NOISE_LEVEL = 1e-3


def cosine_progress(step: int, total_steps: int) -> float:
    r"""`c_k = 0.5 (1 + cos(pi min(k / K, 1)))`: 1 at step 0, 0.5 at `K / 2`, 0 from `K` on (always 0 when `K = 0`)."""
    if total_steps <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))


def renoise_beta_params(step: int, total_steps: int, alpha0: float = 4.0, beta0: float = 1.5) -> tuple[float, float]:
    r"""DynaRS: the Beta parameters `(a_k, b_k)` of the re-noising level at generator step `k`.

    `a_k = 1 + (a_0 - 1) c_k`, `b_k = 1 + (b_0 - 1) c_k` with the cosine progress `c_k`; the defaults `(4, 1.5)` bias
    noise levels towards pure noise (mean 0.727) and reach the uniform `Beta(1, 1)` at `K = total_steps`.
    """
    progress = cosine_progress(step, total_steps)
    return 1.0 + (alpha0 - 1.0) * progress, 1.0 + (beta0 - 1.0) * progress


def real_score_lora_scale(step: int, total_steps: int, scale0: float = 0.5) -> float:
    r"""DynaDG: multiplier of the fake-score LoRA inside the real score, `lambda_0 c_k`, exactly 0 from `K` on."""
    if step >= total_steps:
        return 0.0
    return scale0 * cosine_progress(step, total_steps)


def sample_renoise_levels(batch_size: int, alpha: float, beta: float, rng: np.random.Generator) -> torch.Tensor:
    """Noise levels `t ~ Beta(alpha, beta)` in `[MIN_NOISE_LEVEL, 1]`, shape `(batch_size,)`, float32 on the CPU."""
    levels = rng.beta(alpha, beta, size=batch_size)
    return torch.from_numpy(np.clip(levels, MIN_NOISE_LEVEL, 1.0)).float()


def sample_guidance_scale(scale: float, jitter: float, rng: np.random.Generator) -> float:
    """The real-score CFG scale of one generator update, uniform in `[scale - jitter, scale + jitter]`.

    A scale `<= 1` means no CFG (the released SiT setting): it is returned as 1 with no jitter and no draw.
    """
    if scale <= 1.0:
        return 1.0
    return float(scale + rng.uniform(-jitter, jitter)) if jitter > 0 else float(scale)
