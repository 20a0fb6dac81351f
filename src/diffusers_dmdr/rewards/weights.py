"""Finding and reading reward weights safely: local file or folder first, then the Hub; safetensors or
`torch.load(weights_only=True)`, never arbitrary pickles. Every failure names the file and what to check."""

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..hub_cache import hub_cache_dir, hub_cache_kwargs


OPEN_CLIP_INSTALL_HINT = "pip install 'diffusers-dmdr[rewards]'"
# Suffixes that mark a value as a weight file rather than a Hub repository id.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class RewardLoadError(OSError):
    """A reward model's weights or config could not be found or read."""


def looks_like_local_path(value: str) -> bool:
    """Whether `value` can only mean a local path: explicit path syntax or a weight-file suffix.

    A bare `org/name` is ambiguous (a Hub id or a relative folder); it counts as local only when it exists.
    """
    value = str(value)
    if value.startswith(("hf-hub:", "local-dir:")):
        return value.startswith("local-dir:")
    return (
        os.path.exists(value)
        or value.startswith(("/", "./", "../", "~", "\\"))
        or value.endswith(WEIGHT_FILE_SUFFIXES)
        or not _HUB_REPO_ID.match(value)
    )


def check_model_reference(value: str, option: str) -> None:
    """Raise `ValueError` when a model option names a local path that does not exist (cheap: no download)."""
    value = str(value)
    path = value.removeprefix("local-dir:")
    if value.startswith("hf-hub:"):
        return
    if looks_like_local_path(value) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(
            f"Reward option {option}={value!r} is not an existing local path"
            + ("" if value.startswith("local-dir:") else " nor a Hub repository id")
            + ": check the path, or give a Hub id such as 'org/model'."
        )


def hub_repo_id(value: str) -> str | None:
    """The Hub repository a model option names (`org/name`, or open_clip's `hf-hub:org/name`), or `None` for a local
    path and for a bare name (an open_clip architecture such as `ViT-H-14`)."""
    value = str(value)
    if value.startswith("hf-hub:"):
        return value.removeprefix("hf-hub:")
    if looks_like_local_path(value) or "/" not in value:
        return None
    return value


def check_cached_when_offline(reward: str, option: str, value: str) -> None:
    """With `HF_HUB_OFFLINE=1`, a Hub repository a reward would load must already be in the Hugging Face cache (the
    run's `--cache_dir` or the default one): checked without a request, before any weight loads, so that an offline
    run fails in one line instead of after the teacher loads. Online, or for local paths, nothing is checked."""
    from huggingface_hub import constants, snapshot_download

    repo_id = hub_repo_id(value)
    if repo_id is None or not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(repo_id, local_files_only=True, **hub_cache_kwargs())
    except Exception:
        cache = hub_cache_dir() or constants.HF_HUB_CACHE
        raise ValueError(
            f"Reward {reward!r}: {option}={value} is a Hub repository that is not in the Hugging Face cache ({cache}) "
            f"and HF_HUB_OFFLINE=1 forbids downloading it: run `hf download {repo_id}` once online (with "
            f"--cache-dir if the run passes --cache_dir), or give a local folder ({reward}:{option}=/path/to/folder)."
        ) from None


def image_processor_dict(name_or_path: str) -> dict:
    """The `preprocessor_config.json` of a transformers model folder or Hub id as a dict; `{}` when there is none
    (the caller's defaults apply, as the transformers processors' do)."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_cache_kwargs())
    except OSError:
        return {}
    return processor_dict


def resolve_weight_file(model: str, filename: str | None) -> Path:
    r"""Local path of a single-file checkpoint: `model` itself if it is a file, `model/filename` if it is a folder,
    else `filename` downloaded from the Hub repository `model`.

    Raises:
        `RewardLoadError`: the file does not exist locally or cannot be fetched from the Hub.
    """
    path = Path(os.path.expanduser(model))
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None or not (path / filename).is_file():
            raise RewardLoadError(f"Reward weights {filename!r} not found in the folder {path}.")
        return path / filename
    if looks_like_local_path(model):
        raise RewardLoadError(f"Reward weights not found: {model} does not exist.")
    if filename is None:
        raise RewardLoadError(f"{model!r} is a Hub id, so the reward also needs the checkpoint `filename`.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, filename, **hub_cache_kwargs()))
    except Exception as error:
        raise RewardLoadError(
            f"Could not fetch {filename!r} from the Hub repository {model!r} ({type(error).__name__}: {error}). "
            "Pass a local file or folder instead when the machine is offline."
        ) from error


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    r"""Read a checkpoint into a CPU state dict: safetensors, or `torch.load(weights_only=True)` for `.pt/.pth/.bin`.

    A `{"state_dict": ...}` wrapper and a DataParallel `module.` prefix are removed (HPS and LAION checkpoints
    use them).

    Raises:
        `RewardLoadError`: missing, truncated or non-tensor file, with the path and the reader's error.
    """
    path = Path(path)
    if not path.is_file():
        raise RewardLoadError(f"Reward weights not found: {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RewardLoadError(
            f"Could not read reward weights from {path} ({type(error).__name__}: {error}). The file is corrupt or "
            "truncated, or is a pickle that is not a plain state dict (only safetensors and weights_only "
            "checkpoints are loaded)."
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise RewardLoadError(f"{path} does not hold a state dict of tensors.")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def from_pretrained_or_raise(load: Callable, name_or_path: str, what: str, **kwargs):
    """Call a `from_pretrained`-style `load(name_or_path, **kwargs)`, turning any failure into a `RewardLoadError`
    that names the reward component and the location."""
    try:
        return load(name_or_path, **hub_cache_kwargs(), **kwargs)
    except Exception as error:
        raise RewardLoadError(
            f"Could not load the {what} from {name_or_path!r} ({type(error).__name__}: {error}). Check that the "
            "folder or Hub id exists and that its weight files are complete."
        ) from error


def load_pretrained_model(model_class, name_or_path: str, what: str, **kwargs):
    """`model_class.from_pretrained(name_or_path)` that refuses a partial checkpoint.

    transformers fills weights missing from a checkpoint with random values and only logs it; a reward built
    that way would silently score noise, so missing keys raise a `RewardLoadError` here.
    """
    model, loading_info = from_pretrained_or_raise(
        model_class.from_pretrained, name_or_path, what, output_loading_info=True, **kwargs
    )
    if loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        raise RewardLoadError(
            f"The {what} at {name_or_path!r} lacks {len(missing)} weight(s) (e.g. {missing[:3]}): the checkpoint is "
            "incomplete or of another architecture."
        )
    return model.eval()


def import_open_clip(what: str):
    """Import open_clip, or raise an `ImportError` that says which extra installs it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"{what} needs the open_clip package: {OPEN_CLIP_INSTALL_HINT}.") from error
    return open_clip
