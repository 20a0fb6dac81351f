"""Reward specs, the registry, validation, loading and the weighted reward loss.

A reward is any callable `(images, prompts) -> scores`: `images` a `(B, 3, H, W)` tensor in [0, 1] that carries the
generator's graph, `prompts` a list of `B` strings, `scores` a `(B,)` tensor that keeps the graph. The trainer
never sees a model class: it gets `LoadedReward`s from `load_rewards` and one loss from `compute_reward_loss`.
"""

import logging
import math
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method.losses import reward_loss
from ..utils import DTYPE_ALIASES, DTYPES, resolve_dtype
from .aesthetic import AestheticReward
from .classifier import ClassifierReward
from .clip import TEXT_IMAGE_REWARDS
from .imports import resolve_reward_import_path
from .options import RUNTIME_OPTIONS, check_reward_options, is_reward_factory_function
from .relative import RelativeReward
from .scores import RemoteReward, ScoreReward, is_score_reward


logger = logging.getLogger(__name__)

REWARD_REGISTRY: dict[str, Callable[..., Callable]] = {
    **TEXT_IMAGE_REWARDS,
    "aesthetic": AestheticReward,
    "classifier": ClassifierReward,
    "relative": RelativeReward,
    "remote": RemoteReward,
}
# The paper's hinge threshold (DMDR §4.1); rewards may declare their own `default_hinge`.
DEFAULT_HINGE = 0.7
SPEC_SYNTAX = (
    "name[:weight][:key=value]..., e.g. 'clip:0.3', 'hpsv2.1:0.3:prompt_prefix=Realistic photo ', "
    "'clip:0.3:hinge=none:model=/path/to/clip' or 'my_pkg.rewards.MyReward:1.0'"
)
# A random probe batch checks at load time that a training reward returns `(B,)` scores with a gradient.
PROBE_IMAGE_SIZE = 64
PROBE_PROMPTS = ("a photo of a cat", "an oil painting of a lighthouse")
_SPEC_FIELDS = ("name", "weight", "hinge")


@dataclass
class RewardSpec:
    r"""One reward of the training objective: `weight * reward_loss(reward(images, prompts), hinge)`.

    Args:
        name (`str`):
            A `REWARD_REGISTRY` name (`"clip"`, `"hpsv2.1"`, `"hpsv2"`, `"pickscore"`, `"aesthetic"`,
            `"classifier"`, `"relative"`) or a dotted import path `"pkg.module.Attr"` to a reward class, a factory
            returning a reward, or a reward function `(images, prompts) -> scores`.
        weight (`float`, defaults to 1.0): non-negative weight; 0 logs the reward without training on it.
        hinge (`float`, *optional*, defaults to 0.7):
            Threshold of `relu(hinge - score)`; `None` is the linear loss `-score`. `parse_reward_spec` uses the
            reward's own `default_hinge` when none is given (linear for PickScore, aesthetic and classifier); a
            reward named by import path gets its class's `default_hinge` when loaded, and the linear loss when the
            class declares none (a reward scoring above 0.7 would otherwise train with a zero loss).
        options (`dict`, defaults to `{}`):
            Constructor keyword arguments (e.g. `model`, a local path or Hub id), plus options applied by
            `load_rewards` to any reward: `precision` (`"fp32"`, `"fp16"`, `"bf16"`; overrides the training
            dtype), `offload` (`bool`: keep the weights on the CPU and stream them to the images' device per call)
            and `prompt_prefix` (`str` prepended to every prompt, e.g. `"Realistic photo "` for HPS).
    """

    name: str
    weight: float = 1.0
    hinge: float | None = DEFAULT_HINGE
    options: dict = field(default_factory=dict)
    # True when `parse_reward_spec` filled the hinge in (no `hinge=` given): a custom reward's class may then set it.
    hinge_is_default: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A reward name must be a non-empty string, got {self.name!r}.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not math.isfinite(self.weight):
            raise ValueError(f"Reward {self.name!r}: weight must be a finite number, got {self.weight!r}.")
        if self.weight < 0:
            raise ValueError(f"Reward {self.name!r}: weight must be >= 0, got {self.weight}.")
        if self.hinge is not None and (
            isinstance(self.hinge, bool) or not isinstance(self.hinge, int | float) or not math.isfinite(self.hinge)
        ):
            raise ValueError(f"Reward {self.name!r}: hinge must be a finite number or None, got {self.hinge!r}.")
        reserved = set(self.options) & set(_SPEC_FIELDS)
        if reserved:
            raise ValueError(f"Reward {self.name!r}: {sorted(reserved)} are spec fields, not options.")
        self.weight = float(self.weight)
        self.hinge = None if self.hinge is None else float(self.hinge)

    def to_text(self) -> str:
        """The CLI form, which `parse_reward_spec` reads back to an equal spec."""
        parts = [self.name, repr(self.weight), f"hinge={'none' if self.hinge is None else repr(self.hinge)}"]
        parts += [f"{key}={_format_option_value(value)}" for key, value in self.options.items()]
        return ":".join(parts)

    def to_dict(self) -> dict:
        """The YAML form, which `parse_reward_spec` reads back to an equal spec."""
        return {"name": self.name, "weight": self.weight, "hinge": self.hinge, **self.options}


@dataclass
class LoadedReward:
    r"""A reward ready for the training loop.

    Args:
        name (`str`): unique display name for logs and the progress bar (`"clip"`, or `"clip_2"` for a second one).
        fn (`FrozenReward`): the frozen reward module, called as `fn(images, prompts) -> (B,)` float32 scores.
        weight (`float`): weight of its loss.
        hinge (`float`, *optional*): hinge threshold, `None` for the linear loss.
        spec (`RewardSpec`, *optional*): the spec it was loaded from.
    """

    name: str
    fn: nn.Module
    weight: float
    hinge: float | None
    spec: RewardSpec | None = None


class FrozenReward(nn.Module):
    r"""Wraps any reward callable: frozen and always in eval mode, prompt prefix, precision and CPU offload.

    With `offload=True` the weights stay on the CPU and each call runs on a copy streamed to the images' device
    (`torch.func.functional_call`); the copy is freed once the backward pass has used it. Moving the module back
    and forth instead would break the graph, which holds references to the parameters it was called with.

    Args:
        reward (`Callable`): the reward; an `nn.Module` is frozen (`requires_grad_(False)`, `eval()`).
        name (`str`): display name, used in error messages.
        prompt_prefix (`str`, defaults to `""`): prepended to every prompt.
        offload (`bool`, defaults to `False`): keep the weights on the CPU between calls.
    """

    def __init__(self, reward: Callable, name: str, prompt_prefix: str = "", offload: bool = False):
        super().__init__()
        if isinstance(reward, nn.Module):
            reward.requires_grad_(False).eval()
        self.reward = reward
        self.name = name
        self.prompt_prefix = prompt_prefix
        self.offload = offload and isinstance(reward, nn.Module)
        self.differentiable = getattr(reward, "differentiable", True)

    def to(self, *args, **kwargs) -> "FrozenReward":
        """Like `nn.Module.to`, except that an offloaded reward keeps its weights on the CPU (dtype casts apply)."""
        if not self.offload:
            return super().to(*args, **kwargs)
        _, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        return super().to(dtype=dtype, non_blocking=non_blocking) if dtype is not None else self

    def train(self, mode: bool = True) -> "FrozenReward":
        # A frozen reward never leaves eval mode (dropout or batch-norm updates would change its scores).
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r"""Score images against prompts.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): images in [0, 1], carrying the generator's graph.
            prompts (`list[str]` of length `B`): one prompt per image.

        Returns:
            `torch.Tensor` of shape `(B,)` in float32, with the graph back to `images`.
        """
        prompts = [self.prompt_prefix + prompt for prompt in prompts]
        if self.offload:
            streamed_state = {
                key: tensor.to(images.device, non_blocking=True)
                for key, tensor in [*self.reward.named_parameters(), *self.reward.named_buffers()]
            }
            scores = torch.func.functional_call(self.reward, streamed_state, (images, prompts))
        else:
            scores = self.reward(images, prompts)
        if not isinstance(scores, torch.Tensor) or scores.shape != (images.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"Reward {self.name!r} must return scores of shape ({images.shape[0]},); got {shape}.")
        return scores.float()


def _parse_option_value(text: str):
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _format_option_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "|".join(str(item) for item in value)
    return str(value)


def _default_hinge(name: str) -> float | None:
    """A registered reward's `default_hinge` (else the paper's 0.7); a reward named by import path is not imported
    here (the recipe check comes first) and starts linear, until `with_class_default_hinge` reads its class."""
    if name not in REWARD_REGISTRY:
        return None
    return getattr(REWARD_REGISTRY[name], "default_hinge", DEFAULT_HINGE)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log `message` once per process (the preflight and `load_rewards` both validate the same specs)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def with_class_default_hinge(spec: RewardSpec, factory: Callable) -> RewardSpec:
    """`spec` with the hinge a custom reward's class declares (`default_hinge`) when the spec gave none; a class that
    declares none trains with the linear loss, which says so once."""
    if not spec.hinge_is_default or spec.name in REWARD_REGISTRY:
        return spec
    if hasattr(factory, "default_hinge"):
        hinge = factory.default_hinge
    else:
        hinge = None
        _warn_once(
            f"Reward {spec.name!r} declares no `default_hinge` and the spec gives no hinge: it trains with the linear "
            "loss -score (a 0.7 hinge would give a zero loss to every score above 0.7). Add hinge=0.7 to the spec, "
            "or a `default_hinge` class attribute, for the paper's hinge."
        )
    return RewardSpec(spec.name, spec.weight, hinge, dict(spec.options), hinge_is_default=True)


def parse_reward_spec(spec: "str | dict | RewardSpec") -> RewardSpec:
    r"""Read one reward from the CLI or YAML.

    Args:
        spec (`str`, `dict` or `RewardSpec`):
            CLI text `"name[:weight][:key=value]..."`: `"clip:0.3"`, `"clip:0.3:hinge=none:model=/tmp/clip"`,
            `"my_pkg.rewards.MyReward:1.0"`. Values `none`/`true`/`false` and numbers are converted; a value may
            contain `:` (`model=hf-hub:apple/DFN5B-CLIP-ViT-H-14`) as long as no later piece contains `=`.
            YAML dict `{"name": ..., "weight": ..., "hinge": ..., other keys -> options}`.

    Returns:
        `RewardSpec`; without an explicit hinge, the registered reward's `default_hinge` (else 0.7).

    Raises:
        `ValueError`: the text or dict does not follow the syntax; the message shows it.
    """
    if isinstance(spec, RewardSpec):
        return RewardSpec(spec.name, spec.weight, spec.hinge, dict(spec.options), spec.hinge_is_default)
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"A reward given as a mapping needs a 'name' key; got {spec!r}.")
        weight = options.pop("weight", 1.0)
        hinge_is_default = "hinge" not in options
        hinge = options.pop("hinge", _default_hinge(name))
        if isinstance(hinge, str):
            hinge = _parse_option_value(hinge)
        return RewardSpec(name, weight, hinge, options, hinge_is_default)
    if not isinstance(spec, str):
        raise ValueError(f"A reward spec is a string or a mapping, got {type(spec).__name__}: expected {SPEC_SYNTAX}.")

    name, *pieces = spec.split(":")
    if not name.strip() or "=" in name:
        raise ValueError(f"Invalid reward spec {spec!r}: it must start with a reward name; expected {SPEC_SYNTAX}.")
    fields: dict = {"name": name.strip()}
    options: dict = {}
    last_key = None
    for index, piece in enumerate(pieces):
        if "=" in piece:
            key, value = piece.split("=", 1)
            key = key.strip()
            if not key or key in options or key in fields:
                raise ValueError(
                    f"Invalid reward spec {spec!r}: empty or repeated key {key!r}; expected {SPEC_SYNTAX}."
                )
            options[key] = value
            last_key = key
        elif index == 0:
            try:
                fields["weight"] = float(piece)
            except ValueError:
                raise ValueError(
                    f"Invalid reward spec {spec!r}: {piece!r} is not a weight; expected {SPEC_SYNTAX}."
                ) from None
        elif last_key is not None:
            # A value with colons, such as an open_clip `hf-hub:` id or a Windows path.
            options[last_key] += ":" + piece
        else:
            raise ValueError(f"Invalid reward spec {spec!r}: unexpected {piece!r}; expected {SPEC_SYNTAX}.")
    for key in ("weight", "hinge"):
        if key in options:
            fields[key] = _parse_option_value(options.pop(key))
    if isinstance(fields.get("weight"), str):
        raise ValueError(f"Invalid reward spec {spec!r}: weight must be a number; expected {SPEC_SYNTAX}.")
    if isinstance(fields.get("hinge"), str):
        raise ValueError(f"Invalid reward spec {spec!r}: hinge must be a number or 'none'; expected {SPEC_SYNTAX}.")
    hinge_is_default = "hinge" not in fields
    fields.setdefault("hinge", _default_hinge(fields["name"]))
    # The prompt prefix is text: keep it verbatim (a trailing space matters, "1girl" is not a number).
    return RewardSpec(
        **fields,
        hinge_is_default=hinge_is_default,
        options={
            key: value if key == "prompt_prefix" else _parse_option_value(value) for key, value in options.items()
        },
    )


def resolve_reward_factory(name: str) -> Callable:
    """The registered class for `name`, or the reward class / function that the dotted import path `name` points
    to.

    An import path is checked before anything is called: it must be a reward class or a Python function
    `(images, prompts) -> scores` (`rewards.imports`), so `os.system` and the like are refused.

    Raises:
        `ValueError`: unknown name (the message lists the registry), a dotted path that does not import, or one that
        is not a reward.
    """
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name]
    if "." not in name or name.startswith(".") or name.endswith("."):
        raise ValueError(
            f"Unknown reward {name!r}. Use one of {sorted(REWARD_REGISTRY)} or a dotted import path "
            "'pkg.module.Attr' to your own reward."
        )
    try:
        return resolve_reward_import_path(name)
    except ValueError as error:
        raise ValueError(f"{error} (registered rewards: {sorted(REWARD_REGISTRY)})") from None


def reward_import_paths(spec: "str | dict | RewardSpec") -> list[str]:
    """The import paths to user code a reward spec names: its name when it is not a registered reward, and any
    option a reward declares in `import_path_options` (the classifier's `module`). Paths into this package itself
    (`diffusers_dmdr.digits.reward.DigitClassifierReward`) run no foreign code and are not listed. Nothing is
    imported."""
    spec = parse_reward_spec(spec)
    paths = []
    factory = REWARD_REGISTRY.get(spec.name)
    if factory is None:
        paths.append(spec.name)
    for key in getattr(factory, "import_path_options", ()):
        if isinstance(spec.options.get(key), str):
            paths.append(spec.options[key])
    return [path for path in paths if path.split(".", 1)[0] != __name__.split(".", 1)[0]]


def _check_runtime_options(spec: RewardSpec) -> None:
    precision = spec.options.get("precision")
    if precision is not None and not (
        isinstance(precision, str) and (precision in DTYPES or precision in DTYPE_ALIASES)
    ):
        raise ValueError(f"Reward {spec.name!r}: precision must be one of {sorted(DTYPES)}, got {precision!r}.")
    if not isinstance(spec.options.get("offload", False), bool):
        raise ValueError(f"Reward {spec.name!r}: offload must be true or false, got {spec.options['offload']!r}.")
    if not isinstance(spec.options.get("prompt_prefix", ""), str):
        raise ValueError(f"Reward {spec.name!r}: prompt_prefix must be a string.")


def validate_reward_specs(specs: Iterable["RewardSpec | str | dict"]) -> None:
    r"""Fail fast, before any weights load, on reward specs that cannot work.

    Checks each spec's name (registry or importable dotted path), its option names against the reward's
    constructor, that local model paths exist, that optional packages (open_clip) are installed, and the generic
    options (`precision`, `offload`, `prompt_prefix`).

    Raises:
        `ValueError`: the first problem found, with the fix.
    """
    for spec in specs:
        spec = parse_reward_spec(spec)
        _check_runtime_options(spec)
        factory = resolve_reward_factory(spec.name)
        spec = with_class_default_hinge(spec, factory)
        options = {key: value for key, value in spec.options.items() if key not in RUNTIME_OPTIONS}
        check_reward_options(spec.name, factory, options)
        default_hinge = getattr(factory, "default_hinge", DEFAULT_HINGE)
        if default_hinge is None and spec.hinge is not None:
            _warn_once(
                f"Reward {spec.name!r} scores are not cosine similarities; hinge={spec.hinge} may keep its loss at "
                "zero. Use hinge=none for the linear loss."
            )


def _display_names(specs: list[RewardSpec]) -> list[str]:
    names, counts = [], {}
    for spec in specs:
        base = spec.name if spec.name in REWARD_REGISTRY else spec.name.rsplit(".", 1)[-1]
        counts[base] = counts.get(base, 0) + 1
        names.append(base if counts[base] == 1 else f"{base}_{counts[base]}")
    return names


def _check_passes_gradients(reward: FrozenReward, device: torch.device) -> None:
    if reward.differentiable is False:
        raise ValueError(
            f"Reward {reward.name!r} declares differentiable = False, so reward back-propagation cannot train on it: "
            "train with a policy-gradient objective (--rl grpo or --rl dpo), or give it weight 0 as a monitor."
        )
    prompts = list(getattr(reward.reward, "example_prompts", PROBE_PROMPTS))[:2]
    # A reward on whole clips (`input_kind = "video"`, see `rewards/video.py`) is probed with 2-frame clips.
    frames = (2,) if getattr(reward.reward, "input_kind", "image") == "video" else ()
    probe = torch.rand(
        len(prompts), 3, *frames, PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE, generator=torch.Generator().manual_seed(0)
    )
    probe = probe.to(device).requires_grad_(True)
    # The probe must not shift the global RNG streams (a reward may draw from them, as the relative one does):
    # exact resume and seeded runs depend on them.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        scores = reward(probe, prompts)
        if not scores.requires_grad:
            raise ValueError(
                f"Reward {reward.name!r} returned scores without a graph back to the images (a no_grad block, a "
                "numpy/PIL round trip or an argmax), so it cannot pass gradients for training."
            )
        (image_grad,) = torch.autograd.grad(scores.sum(), probe)
    if not torch.isfinite(image_grad).all() or not image_grad.abs().sum() > 0:
        raise ValueError(
            f"Reward {reward.name!r} gives a zero or non-finite gradient on a random probe image, so it cannot "
            "train the generator."
        )


def load_rewards(
    specs: Iterable["RewardSpec | str | dict"],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    for_training: bool = True,
) -> list[LoadedReward]:
    r"""Build, freeze and place the rewards of a run.

    Args:
        specs (iterable of `RewardSpec`, `str` or `dict`): the rewards, in CLI or YAML form or already parsed.
        device (`torch.device` or `str`): where the rewards run (weights stay on the CPU with `offload=true`).
        dtype (`torch.dtype`, defaults to `torch.float32`): weight dtype, unless a spec sets `precision`.
        for_training (`bool`, defaults to `True`):
            Refuse rewards that cannot pass gradients: `differentiable = False`, or a random probe batch whose
            scores have no graph or a zero gradient. `False` (evaluation) skips the check.

    Returns:
        `list[LoadedReward]` in the order of `specs`, with unique display names.
    """
    specs = [parse_reward_spec(spec) for spec in specs]
    validate_reward_specs(specs)
    device = torch.device(device)
    loaded = []
    for spec, name in zip(specs, _display_names(specs), strict=True):
        factory = resolve_reward_factory(spec.name)
        spec = with_class_default_hinge(spec, factory)
        options = {key: value for key, value in spec.options.items() if key not in RUNTIME_OPTIONS}
        reward = factory if is_reward_factory_function(factory) else factory(**options)
        if is_score_reward(reward) and not isinstance(reward, nn.Module):
            # A scorer of decoded images (uint8 / PIL in, floats out) joins the tensor protocol here.
            reward = ScoreReward(reward, name=name)
        if not callable(reward):
            raise ValueError(f"Reward {spec.name!r} built a {type(reward).__name__}, which is not callable.")
        offload = spec.options.get("offload", False)
        if isinstance(reward, nn.Module):
            reward_dtype = resolve_dtype(spec.options["precision"]) if "precision" in spec.options else dtype
            reward.to(device=torch.device("cpu") if offload else device, dtype=reward_dtype)
        frozen_reward = FrozenReward(reward, name, spec.options.get("prompt_prefix", ""), offload)
        if for_training:
            _check_passes_gradients(frozen_reward, device)
        loaded.append(LoadedReward(name, frozen_reward, spec.weight, spec.hinge, spec))
        logger.info("Loaded reward %s (weight %s, hinge %s).", name, spec.weight, spec.hinge)
    return loaded


def set_reward_step(rewards: Iterable[LoadedReward], step: int) -> None:
    """Tell the rewards that draw random choices (the relative reward's control words) which generator step comes
    next, so that their draws are a function of `(seed, step)` and a resumed run repeats them."""
    for loaded in rewards:
        reward = getattr(loaded.fn, "reward", loaded.fn)
        if hasattr(reward, "set_step"):
            reward.set_step(step)


def compute_reward_loss(
    rewards: list[LoadedReward], images: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Weighted reward loss of a batch: `sum_j weight_j * reward_loss(scores_j, hinge_j)` (DMDR Eq. 3's `L_rl`).

    Args:
        rewards (`list[LoadedReward]`): from `load_rewards`.
        images (`torch.Tensor` of shape `(B, 3, H, W)`): decoded student images in [0, 1], with the graph.
        prompts (`list[str]` of length `B`): their prompts.

    Returns:
        `(total_loss, mean_scores)`: the scalar float32 loss with the graph, and each reward's detached batch-mean
        score by display name. Rewards of weight 0 are scored without a graph, for monitoring only.
    """
    total_loss = torch.zeros((), device=images.device, dtype=torch.float32)
    mean_scores = {}
    for reward in rewards:
        if reward.weight == 0:
            with torch.no_grad():
                scores = reward.fn(images, prompts)
        else:
            scores = reward.fn(images, prompts)
            total_loss = total_loss + reward.weight * reward_loss(scores, reward.hinge)
        mean_scores[reward.name] = scores.detach().mean()
    return total_loss, mean_scores


def compute_reward_loss_sequentially(
    rewards: list[LoadedReward],
    images: torch.Tensor,
    prompts: list[str],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""[`compute_reward_loss`] with each reward's backward run at once, so that one reward tower at a time holds its
    activations (and, with `offload=True`, its streamed weights) on the device (`--sequential_reward_backward`).

    The images are cut from their graph at a leaf; each trained reward scores the leaf under `autocast` and its
    weighted loss is back-propagated to the leaf right away, which frees that tower's graph before the next reward
    runs. The returned loss is the surrogate `sum(images * leaf.grad)` shifted to the value of the summed losses: its
    gradient through `images` is `leaf.grad`, the gradient `compute_reward_loss`'s loss would send there (the chain
    rule, split at the images), and it is linear in it, so a later division (gradient accumulation) or loss scaling
    applies to it as it would to the summed losses. The towers' own backward runs here, unscaled: under fp16 a loss
    scaler does not protect it (the objective refuses fp16 autocast).

    Args:
        rewards (`list[LoadedReward]`): from `load_rewards`.
        images (`torch.Tensor` of shape `(B, 3, H, W)`): decoded student images in [0, 1], with the graph.
        prompts (`list[str]` of length `B`): their prompts.
        autocast (`Callable`, defaults to no context): the mixed-precision context of the rewards' forward passes
            (their backward passes run outside it, as the trainer's do).

    Returns:
        `(total_loss, mean_scores)` as [`compute_reward_loss`]: the loss's value is the summed weighted losses; its
        graph reaches the images only, the towers' graphs are already freed. Rewards of weight 0 are scored without
        a graph, for monitoring only.
    """
    leaf = images.detach().requires_grad_()
    total_value = torch.zeros((), device=images.device, dtype=torch.float32)
    mean_scores = {}
    for reward in rewards:
        if reward.weight == 0:
            with torch.no_grad(), autocast():
                scores = reward.fn(leaf, prompts)
        else:
            with autocast():
                scores = reward.fn(leaf, prompts)
                weighted_loss = reward.weight * reward_loss(scores, reward.hinge)
            if weighted_loss.requires_grad:  # a reward without a gradient path adds its value only, as it would there
                weighted_loss.backward()
            total_value = total_value + weighted_loss.detach()
        mean_scores[reward.name] = scores.detach().mean()
    if leaf.grad is None:  # no trained reward (or none whose scores depend on the images): a constant loss
        return total_value, mean_scores
    surrogate = (images.float() * leaf.grad.float()).sum()
    return surrogate - surrogate.detach() + total_value, mean_scores


def check_recipe_import_paths(config) -> None:
    """Refuse the import paths to user code in the reward lists a recipe file supplied (`config.recipe_reward_lists`)
    unless the command line opted in (`--allow_reward_import_paths`). Nothing is imported; the preflight runs this
    before any other reward check, since those resolve (import) the paths."""
    if config.allow_reward_import_paths:
        return
    for key, recipe in config.recipe_reward_lists.items():
        for spec in getattr(config, key):
            paths = reward_import_paths(spec)
            if paths:
                raise ValueError(
                    f"{recipe}: `{key}` names the import path {paths[0]!r}; importing it would run code from a recipe "
                    "file. If you trust this recipe, pass --allow_reward_import_paths on the command line; otherwise "
                    f"use a registered reward {sorted(REWARD_REGISTRY)}."
                )


def reward_names_epilog() -> str:
    """The built-in reward names with one line each, from the registry (what `--reward` accepts besides a dotted
    import path): the epilog of the train and evaluate `--help`."""
    lines = ["built-in rewards (--reward NAME[:WEIGHT][:key=value...], or a dotted import path):"]
    for name, factory in sorted(REWARD_REGISTRY.items()):
        paragraph = " ".join(line.strip() for line in (factory.__doc__ or "").strip().split("\n\n")[0].splitlines())
        summary = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
        lines.append(f"  {name:<12} {summary}")
    return "\n".join(lines)
