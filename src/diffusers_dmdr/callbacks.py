"""Trainer callbacks: code that runs at fixed points of `DMDRTrainer.train()` without replacing trainer methods.

A callback is any object with some of these methods (missing ones are skipped); subclass [`TrainerCallback`] to get
no-op defaults:

- `on_step_end(trainer, step, logs)`: after every generator update, once its logs are final (`step` counts from 1,
  `logs` is the dict recorded in `trainer.history`);
- `on_checkpoint(trainer, step, path)`: after `trainer.save_checkpoint()` wrote `path` (on every process; the
  folder is complete and renamed into place when it is called).

```py
class PrintLoss(TrainerCallback):
    def on_step_end(self, trainer, step, logs):
        print(step, logs["loss_dmd"])

DMDRTrainer(config, teacher, prompts, rewards, callbacks=[PrintLoss()]).train()
```

Callbacks observe: a callback that samples from the student must leave it as it found it (train mode, same RNG
streams of the trainer, which draws from its own generators; see `method/draws.py`).
"""

from collections.abc import Sequence
from pathlib import Path


CALLBACK_EVENTS = ("on_step_end", "on_checkpoint")


class TrainerCallback:
    """Base class with a no-op method per event of `CALLBACK_EVENTS`."""

    def on_step_end(self, trainer, step: int, logs: dict) -> None:
        """After generator update `step` (from 1); `logs` are that step's entry of `trainer.history`."""

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        """After the checkpoint of `step` was written to `path`."""


def check_callbacks(callbacks: Sequence | None) -> list:
    """The callbacks as a list; each must implement at least one event (a typo'd method name is an error).

    Raises:
        `TypeError`: for an object that has none of the `CALLBACK_EVENTS` methods.
    """
    callbacks = list(callbacks or [])
    for callback in callbacks:
        if not any(callable(getattr(callback, event, None)) for event in CALLBACK_EVENTS):
            raise TypeError(
                f"The trainer callback {callback!r} has none of the methods {', '.join(CALLBACK_EVENTS)}; "
                "subclass diffusers_dmdr.callbacks.TrainerCallback and override one of them."
            )
    return callbacks


def run_callbacks(callbacks: Sequence, event: str, trainer, **kwargs) -> None:
    """Call `event(trainer, **kwargs)` on every callback that has it, in order."""
    if event not in CALLBACK_EVENTS:
        raise ValueError(f"Unknown trainer callback event {event!r}; the events are {CALLBACK_EVENTS}.")
    for callback in callbacks:
        method = getattr(callback, event, None)
        if callable(method):
            method(trainer, **kwargs)
