"""Every Hub request of the export, each under a deadline and caught.

huggingface_hub 2.4 sends requests through one shared `httpx2.Client` created with `timeout=None`, and retries
429/5xx/network errors with back-off (`http_backoff`, up to 5 retries): against a server that accepts connections but
never answers, `create_repo` waits forever. Here each call runs (a) with a client whose every read/connect/write has
the timeout (public `set_client_factory`) and (b) in a worker thread joined with the same total deadline, so retries
cannot add up either. A local export sends no request at all: the teacher's card is read from its folder or the
local Hub cache, never fetched for it.
"""

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .export_layout import LOCAL_PATHS_FILE
from .hub_cache import hub_cache_kwargs


logger = logging.getLogger(__name__)

T = TypeVar("T")
# Files of a training run that share the export folder but are not part of the model repo (checkpoints, partial
# checkpoints of an interrupted save, tracker logs).
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    ".checkpoint-*",
    "logs/*",
    "validation/*",
    "*.lock",
    "wandb/*",
    LOCAL_PATHS_FILE,  # this machine's folders, never published
]


class HubUploadError(RuntimeError):
    """The Hub refused, broke or timed out an upload; the message holds the command that retries it."""


class HubTimeoutError(TimeoutError):
    """A Hub request did not finish within its deadline."""


def hub_id_of(source: str) -> str | None:
    """The Hub id of a teacher given as a Hub id or as a Hub cache snapshot folder; `None` for other folders."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path.resolve().as_posix())
    return f"{match[1]}/{match[2]}" if match else None


def _current_client_factory():
    """huggingface_hub's installed client factory (private `_GLOBAL_CLIENT_FACTORY`), to restore it afterwards."""
    from huggingface_hub.utils import _http

    return _http._GLOBAL_CLIENT_FACTORY


@contextlib.contextmanager
def hub_client_timeout(timeout: float):
    """Within the block, every request of huggingface_hub's shared client times out after `timeout` seconds."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    previous = _current_client_factory()

    def factory():
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=httpx2.Timeout(timeout)
        )

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def call_with_deadline(function: Callable[[], T], timeout: float, what: str) -> T:
    """`function()` with per-request timeouts, abandoned after `timeout` seconds in total (retries included).

    Raises:
        `HubTimeoutError`: the deadline passed (the worker thread is a daemon and cannot keep the process alive);
        otherwise whatever `function` raised.
    """
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    with hub_client_timeout(timeout):
        worker = threading.Thread(target=work, name=f"hub: {what}", daemon=True)
        worker.start()
        worker.join(timeout)
    if worker.is_alive():
        raise HubTimeoutError(f"{what} did not finish within {timeout:g} s (--hub_timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cached_model_card_data(repo_id: str, revision: str | None = None) -> dict:
    """The metadata of `repo_id`'s README.md when it is in the local Hub cache; no request is sent."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "README.md", revision=revision, **hub_cache_kwargs())
    if not isinstance(cached, str):
        return {}
    try:
        return ModelCard.load(cached).data.to_dict()
    except (OSError, ValueError) as error:
        logger.warning(f"Could not read the cached model card of {repo_id} ({type(error).__name__}).")
        return {}


def remote_model_card_data(repo_id: str, revision: str | None, timeout: float) -> dict:
    """The metadata of `repo_id`'s model card at `revision` (the pinned teacher's, `main` when `None`) from the Hub,
    within `timeout`; `{}` (with a warning) on any failure."""
    from huggingface_hub import ModelCard, hf_hub_download

    cache = hub_cache_kwargs()  # read here: the deadline's worker thread does not see this context's cache folder

    def load_card():
        # `ModelCard.load` takes no revision: download the card at the pinned one, then read it.
        return ModelCard.load(hf_hub_download(repo_id, "README.md", revision=revision, **cache))

    try:
        card = call_with_deadline(load_card, timeout, f"reading the model card of {repo_id}")
    except Exception as error:  # a missing card, a dead or misbehaving Hub: the export's card just has no licence
        logger.warning(
            f"Could not read the model card of {repo_id} ({type(error).__name__}); the card has no license."
        )
        return {}
    return card.data.to_dict()


def push_folder(
    folder: str | Path,
    repo_id: str,
    retry_command: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DMDR few-step student",
    timeout: float = 90.0,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` without checkpoints or logs, each call within `timeout`.

    The token is the one given or the logged-in one; it is never logged, and is masked in the error message.

    Raises:
        [`HubUploadError`]: on any failure (refusal, 5xx, closed connection, timeout), naming `retry_command`.

    Returns:
        `str`: the URL of the commit.
    """
    from huggingface_hub import create_repo, get_token, upload_folder

    folder = Path(folder)
    try:
        repo_id = call_with_deadline(
            lambda: create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id,
            timeout,
            f"creating the Hub repo {repo_id}",
        )
        commit = call_with_deadline(
            lambda: upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
                token=token,
            ),
            timeout,
            f"uploading {folder}",
        )
    except Exception as error:
        # Any failure (network, auth, server, timeout) ends here: the export on disk is complete.
        secret = token or get_token()
        reason = f"{type(error).__name__}: {error}"
        if secret:
            reason = reason.replace(secret, "***")
        raise HubUploadError(
            f"Uploading {folder} to the Hub repo {repo_id} failed ({reason}). The export folder is intact. Retry "
            f"with:\n  {retry_command}\n(log in first with `hf auth login` if the token was refused)."
        ) from None
    logger.info(f"Pushed {folder} to {commit.commit_url}")
    return commit.commit_url


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DMDR few-step student",
    checkpoint: str | Path | None = None,
    timeout: float = 90.0,
) -> str:
    """Create `repo_id` (if needed) and upload `folder`, leaving checkpoints and logs out (see `hub.push_folder`).

    The token is the one given or the logged-in one; it is never logged nor written anywhere.

    Args:
        folder (`str` or `Path`): the export folder.
        repo_id (`str`): the Hub repo, `org/name`.
        private (`bool`, defaults to `False`): create the repo as private.
        token (`str`, *optional*): a Hub token; defaults to the logged-in one.
        commit_message (`str`): the commit message.
        checkpoint (`str` or `Path`, *optional*): the checkpoint the folder was exported from, for the retry
            command of the error message; defaults to `folder` (a run's output_dir holding its checkpoints).
        timeout (`float`, defaults to 90.0): seconds each Hub call (repo creation, upload) may take, retries included.

    Raises:
        [`HubUploadError`]: on any failure or timeout, with the command that retries; the local folder is untouched.

    Returns:
        `str`: the URL of the commit.
    """
    retry = (
        f"dmdr-export --checkpoint {checkpoint or folder} --output_dir {folder} --push_to_hub --hub_model_id {repo_id}"
    )
    return push_folder(
        folder, repo_id, retry, private=private, token=token, commit_message=commit_message, timeout=timeout
    )
