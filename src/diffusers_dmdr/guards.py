"""Divergence guard: stop a run whose losses or weights explode, before a diverged checkpoint is written.

NaN/inf losses and gradients are skipped by the trainer (the weights stay unchanged); an exploding learning rate,
however, can drive the weights to 1e20 while every loss stays finite. `DivergenceGuard` watches both, against a
running reference, and the trainer stops the run on its first finding.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DivergenceError(RuntimeError):
    """Raised when the divergence guard finds an exploding loss or weight norm; the message names the checkpoint
    to resume from."""


def trainable_weight_norm(parameters: Iterable[torch.Tensor]) -> float:
    r"""The L2 norm of all `parameters` together, `sqrt(sum_p ||p||^2)`, in float64 (no overflow at 1e20)."""
    squares = [torch.linalg.vector_norm(p.detach(), dtype=torch.float64) ** 2 for p in parameters]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


@dataclass
class DivergenceGuard:
    r"""Flags a loss or a trainable-weight-norm explosion against a running reference.

    Rules, checked after every generator update (a factor of 0 switches its rule off):

    - **weights**: for each group `g` (student, fake score), with `N_g(0)` its weight norm when the run (or the
      resume) started, the step diverged if `N_g(t) > weight_norm_factor * N_g(0)` or `N_g(t)` is not finite.
    - **losses**: for each loss `l`, `R_l` is an exponential moving average of `|l|` over healthy steps,
      `R_l <- decay * R_l + (1 - decay) * |l|` (the first healthy value starts it). Once `warmup_steps` healthy steps
      have built it, the step diverged if `|l| > loss_factor * max(R_l, loss_floor)`. The floor keeps a loss that has
      converged to ~0 from tripping on noise. Non-finite losses are left to the trainer's skip-and-count logic.

    A diverged step does not update the references. The references are not checkpointed: a resumed run rebuilds
    them, starting from the weights it resumed.

    Args:
        loss_factor (`float`, defaults to 100.0): allowed ratio of a loss to its reference.
        weight_norm_factor (`float`, defaults to 10.0): allowed ratio of a weight norm to its start value.
        warmup_steps (`int`, defaults to 5): healthy steps before the loss rule applies.
        decay (`float`, defaults to 0.9): EMA decay of the loss references.
        loss_floor (`float`, defaults to 1e-3): smallest loss reference.
    """

    loss_factor: float = 100.0
    weight_norm_factor: float = 10.0
    warmup_steps: int = 5
    decay: float = 0.9
    loss_floor: float = 1e-3
    weight_norm_reference: dict[str, float] = field(default_factory=dict)
    loss_reference: dict[str, float] = field(default_factory=dict)
    healthy_steps: int = 0

    @classmethod
    def from_config(cls, config) -> "DivergenceGuard":
        return cls(
            loss_factor=config.divergence_loss_factor,
            weight_norm_factor=config.divergence_weight_norm_factor,
            warmup_steps=config.divergence_warmup_steps,
        )

    def start(self, weight_norms: dict[str, float]) -> None:
        """Record the weight norms the run starts from (the reference of the weight rule)."""
        self.weight_norm_reference = dict(weight_norms)

    def check(self, losses: dict[str, float], weight_norms: dict[str, float]) -> str | None:
        """The reason the step diverged, or None (then the references take this step in)."""
        if self.weight_norm_factor:
            for name, norm in weight_norms.items():
                reference = self.weight_norm_reference.setdefault(name, norm)
                if not math.isfinite(norm) or norm > self.weight_norm_factor * reference:
                    return (
                        f"the {name} weight norm is {norm:.4g}, more than {self.weight_norm_factor:g}x its start "
                        f"value {reference:.4g} (--divergence_weight_norm_factor)"
                    )
        finite = {name: abs(value) for name, value in losses.items() if value is not None and math.isfinite(value)}
        if self.loss_factor and self.healthy_steps >= self.warmup_steps:
            for name, value in finite.items():
                reference = max(self.loss_reference.get(name, value), self.loss_floor)
                if value > self.loss_factor * reference:
                    return (
                        f"|{name}| is {value:.4g}, more than {self.loss_factor:g}x its running reference "
                        f"{reference:.4g} (--divergence_loss_factor)"
                    )
        for name, value in finite.items():
            previous = self.loss_reference.get(name)
            self.loss_reference[name] = value if previous is None else self.decay * previous + (1 - self.decay) * value
        self.healthy_steps += 1
        return None


def resume_advice(last_checkpoint: Path | None) -> str:
    """What to resume from after an abort: the last checkpoint written after a healthy step, by name."""
    if last_checkpoint is None:
        return "No checkpoint was written before it; restart the run with a lower --learning_rate."
    return (
        f"The last healthy checkpoint is {last_checkpoint}: resume with --resume_from_checkpoint {last_checkpoint} "
        "and a lower --learning_rate / --learning_rate_fake."
    )
