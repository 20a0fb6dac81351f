"""Import paths to user code (`pkg.module.Attr`) in reward specs: resolved and checked before anything is called.

An import path can name any attribute of any importable module, `os.system` included; calling it with a spec's
options would run whatever a recipe file says. So an import path must resolve to a reward class (an `nn.Module`
subclass, or a class whose instances are called as `(images, prompts)`) or a plain Python reward function
`(images, prompts) -> scores`, and it is checked before it is called.
"""

import importlib
import inspect
from collections.abc import Callable

from torch import nn


def import_attribute(path: str, what: str):
    """`pkg.module.Attr` -> the attribute, without calling it; `ValueError` naming `what` and the path otherwise."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute or path.startswith("."):
        raise ValueError(f"{what} {path!r} is not an import path 'pkg.module.Attr'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"{what} {path!r}: its module {module_name!r} does not import ({type(error).__name__}: {error})."
        ) from error
    if not hasattr(module, attribute):
        raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {attribute!r}.")
    return getattr(module, attribute)


def _takes_images_and_prompts(function: Callable, bound: bool) -> bool:
    """`function` names two positional parameters (after `self` when `bound`) and requires no other one (a bare
    `*args` is not enough: `os.path.join(a, *p)` would pass)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if bound:
        parameters = parameters[1:]
    positional = [
        p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    required_keyword_only = [
        p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    return len(positional) >= 2 and len(required) <= 2 and not required_keyword_only


def is_reward_class(candidate) -> bool:
    """A class whose instances are rewards: an `nn.Module` whose `forward`, or a class whose own `__call__`, takes
    `(images, prompts)`."""
    if not inspect.isclass(candidate):
        return False
    if issubclass(candidate, nn.Module):
        return _takes_images_and_prompts(candidate.forward, bound=True)
    defines_call = any("__call__" in vars(klass) for klass in candidate.__mro__ if klass not in (object, type))
    return defines_call and _takes_images_and_prompts(candidate.__call__, bound=True)


def is_reward_function(candidate) -> bool:
    """A plain Python function (not a builtin, not a class) with the reward signature `(images, prompts)`."""
    return inspect.isfunction(candidate) and _takes_images_and_prompts(candidate, bound=False)


def resolve_reward_import_path(path: str) -> Callable:
    """Import `path` and check, before calling anything, that it is a reward class or a reward function."""
    candidate = import_attribute(path, "Reward")
    if not (is_reward_class(candidate) or is_reward_function(candidate)):
        kind = type(candidate).__name__
        raise ValueError(
            f"Reward {path!r} is a {kind} but not a reward: an import path must name a reward class (an nn.Module "
            "or a class whose instances are called as (images, prompts) -> scores) or a Python function "
            "(images, prompts) -> scores; nothing was called."
        )
    return candidate


def resolve_module_class(path: str, what: str) -> type[nn.Module]:
    """Import `path` and check that it is an `nn.Module` subclass before it is instantiated."""
    candidate = import_attribute(path, what)
    if not (inspect.isclass(candidate) and issubclass(candidate, nn.Module)):
        raise ValueError(
            f"{what} {path!r} is a {type(candidate).__name__}, not a torch.nn.Module class; nothing was called."
        )
    return candidate
