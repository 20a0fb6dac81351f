"""One optimizer for the one training module: a parameter group per role, each with its own learning-rate schedule.

Two-time-scale updates (TTUR) on one optimizer: the fake score steps every iteration and the student every
`update_ratio`-th. A step for one role leaves the other group untouched because that group holds no gradients
(`zero_grad(set_to_none=True)` after every step; AdamW and bitsandbytes' AdamW8bit skip parameters whose gradient is
`None`, so their moments and step counts stay the role's own). `step_role` also sets the other group's learning rate
to 0 for that step, so its weights cannot move whatever its gradients. That alone is not enough: engines that keep
gradients in flat buffers (DeepSpeed ZeRO) hand the idle group zeros instead of `None`, and its Adam moments and step
count advance (the student's first update falls to 0.52x its learning rate at TTUR 5), which is why DeepSpeed is
refused (`sharding.check_engine_supported`; tests/test_engines.py measures both).

Learning rates are a pure function of the progress counters (`iteration` for the fake score, `global_step` for the
student), so a resumed run recomputes them and no scheduler state is checkpointed.
"""

from collections.abc import Callable

import torch


def lr_multiplier(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """diffusers' schedule `name` as a function of the step: the lambda of `diffusers.optimization.get_scheduler`."""
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer=probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"--lr_scheduler {name}: only diffusers' LambdaLR schedules are supported.")
    return scheduler.lr_lambdas[0]


def make_optimizer(
    groups: dict[str, list[torch.nn.Parameter]],
    learning_rates: dict[str, float],
    weight_decays: dict[str, float],
    betas: tuple[float, float],
    eps: float,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) with one parameter group per role, tagged `role`."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError(
                "--use_8bit_adam needs bitsandbytes: `pip install diffusers-dmdr[bnb]` (or `pip install "
                "bitsandbytes`), or drop --use_8bit_adam."
            ) from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    param_groups = [
        {"params": params, "lr": learning_rates[role], "weight_decay": weight_decays[role], "role": role}
        for role, params in groups.items()
        if params
    ]
    return optimizer_class(param_groups, betas=betas, eps=eps)


def set_learning_rates(optimizer: torch.optim.Optimizer, learning_rates: dict[str, float]) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rates[group["role"]]


def only_role(learning_rates: dict[str, float], role: str) -> dict[str, float]:
    """`learning_rates` with every group but `role`'s at 0 (see the module docstring)."""
    return {name: (lr if name == role else 0.0) for name, lr in learning_rates.items()}


def step_role(optimizer: torch.optim.Optimizer, role: str, learning_rates: dict[str, float]) -> None:
    """Step only `role`'s group: the others run at learning rate 0 for this step (see the module docstring)."""
    set_learning_rates(optimizer, only_role(learning_rates, role))
    optimizer.step()
    set_learning_rates(optimizer, learning_rates)
    optimizer.zero_grad(set_to_none=True)
