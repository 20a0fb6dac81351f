"""The default student grid of a stock flow pipeline: the teacher scheduler's own sigmas at the training resolution.

The Z-Image pipeline does not warp a grid by a fixed formula: it hands the teacher's scheduler a list of default
sigmas and `mu`, the resolution-dependent shift computed from the image sequence length, and the scheduler applies its
configured shift (static `shift`, or `use_dynamic_shifting` with `mu`, a terminal stretch, ...). Z-Image's student
grid is exactly that schedule for the training resolution and step count, computed by the same scheduler class from
the same config, so the student samples where the teacher would. (Qwen-Image's scheduler stretches the last sigma to
0.02, which is no few-step grid: its family uses a static shift instead, `families/qwenimage.py`.)
"""

from collections.abc import Callable

import torch


def image_sequence_length(latent_size: int, patch_size: int = 2) -> int:
    """Tokens of a square `latent_size` x `latent_size` latent cut into `patch_size` x `patch_size` patches (the
    `image_seq_len` of the stock Z-Image pipeline)."""
    return (latent_size // patch_size) ** 2


def stock_flow_grid(
    scheduler_config: dict,
    default_sigmas: list[float],
    image_seq_len: int,
    calculate_shift: Callable[..., float],
) -> tuple[list[float], float | None]:
    r"""The timesteps the stock pipeline would sample with, and the `mu` it used (`None` without dynamic shifting).

    `mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)` with the
    scheduler config's values and the stock pipeline's defaults (256, 4096, 0.5, 1.15), then
    `scheduler.set_timesteps(sigmas=default_sigmas, mu=mu)` on a fresh scheduler of the teacher's class and config; the
    grid is `scheduler.timesteps` (`sigma * num_train_timesteps`, float32, noisiest first), which the model receives.

    Args:
        scheduler_config (`dict`): the teacher scheduler's config (its `_class_name` picks the diffusers class).
        default_sigmas (`list[float]`): the unshifted sigmas the stock pipeline passes (`linspace(1, 1 / N, N)`).
        image_seq_len (`int`): the image tokens at the training resolution.
        calculate_shift (`Callable`): the stock pipeline module's own `calculate_shift`.
    """
    import diffusers

    class_name = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    scheduler = getattr(diffusers, class_name).from_config(scheduler_config)
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=list(default_sigmas), device=torch.device("cpu"), mu=mu)
    timesteps = [float(timestep) for timestep in scheduler.timesteps]
    return timesteps, (float(mu) if scheduler_config.get("use_dynamic_shifting", False) else None)


def static_shift_config(scheduler_config: dict, shift: float) -> dict:
    """The scheduler config with a fixed `shift` instead of its own shifting (`--shift` given by the user)."""
    return {**scheduler_config, "shift": float(shift), "use_dynamic_shifting": False}
