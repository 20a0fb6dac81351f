"""Checks of a reward's constructor options before any weight loads (shared by the registry and the relative reward,
which checks the options of the reward it wraps)."""

import inspect
from collections.abc import Callable

from .weights import check_cached_when_offline, check_model_reference


# Options that `load_rewards` applies around any reward instead of passing them to its constructor.
RUNTIME_OPTIONS = ("precision", "offload", "prompt_prefix")


def is_reward_factory_function(factory: Callable) -> bool:
    """A non-class callable with two required positional parameters is a reward itself, not a factory."""
    if inspect.isclass(factory):
        return False
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters) >= 2


def check_reward_options(name: str, factory: Callable, options: dict) -> None:
    """Check constructor options without loading weights: accepted names, existing local paths and installed
    packages (a reward's `check_requirements(options)`). Raises `ValueError` naming the fix."""
    if is_reward_factory_function(factory):
        if options:
            raise ValueError(f"Reward {name!r} is a reward function and takes no options; got {sorted(options)}.")
        return
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for reward {name!r}; it accepts {sorted(parameters)} plus "
                f"{list(RUNTIME_OPTIONS)}."
            )
    path_options = getattr(factory, "path_options", ("model",))
    for key in path_options:
        if isinstance(options.get(key), str):
            check_model_reference(options[key], key)
    check_requirements = getattr(factory, "check_requirements", None)
    if check_requirements is not None:
        try:
            check_requirements(options)
        except ImportError as error:
            raise ValueError(f"Reward {name!r}: {error}") from error
    # Offline, a Hub id (given, or the constructor's default) must already be in the cache.
    for key in path_options:
        default = parameters[key].default if parameters is not None and key in parameters else None
        value = options.get(key, default)
        if isinstance(value, str):
            check_cached_when_offline(name, key, value)
