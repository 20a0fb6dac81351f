"""How every command line of the package ends on an error: one line naming the problem, not a traceback.

`dmdr-train`, `dmdr-export`, `python -m diffusers_dmdr.evaluate`, the demo and `build-tiny` run their `main` through
[`run_entry_point`]. A bad input the package itself reported (a `USER_INPUT_ERRORS` raised by one of its `raise`
statements) prints `<program>: error: <message>` and exits with status 2, like an argparse error; the project's own
run-time errors (a corrupt checkpoint, non-finite losses, a diverging run, a failed upload) print the same line and
exit with status 1. `--debug` on the command line (or `DMDR_DEBUG=1`) re-raises instead, with the full traceback.
Any other exception is a bug and always keeps its traceback.
"""

import linecache
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .config import USER_INPUT_ERRORS


T = TypeVar("T")
DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT_VARIABLE = "DMDR_DEBUG"
DEBUG_HELP = f"show the full traceback of an error (also {DEBUG_ENVIRONMENT_VARIABLE}=1)"
# The project's run-time errors, by module and class name. An error can only have been raised by a module that was
# imported, so the classes are looked up among the loaded modules (the handler imports nothing heavy);
# tests/test_cli_errors.py asserts that each name still exists.
PROJECT_ERRORS = (
    ("diffusers_dmdr.checkpointing", "CheckpointError"),
    ("diffusers_dmdr.trainer", "NonFiniteLossError"),
    ("diffusers_dmdr.guards", "DivergenceError"),
    ("diffusers_dmdr.hub", "HubUploadError"),
)
# Where the project's own code lives (the pipelines ship from their own folder in a checkout).
_PACKAGE_DIRS: tuple[Path, ...] | None = None


def _package_dirs() -> tuple[Path, ...]:
    global _PACKAGE_DIRS
    if _PACKAGE_DIRS is None:
        import diffusers_dmdr
        import diffusers_dmdr.pipelines

        modules = (diffusers_dmdr, diffusers_dmdr.pipelines)
        _PACKAGE_DIRS = tuple(Path(module.__file__).resolve().parent for module in modules)
    return _PACKAGE_DIRS


def is_checked_input_error(error: BaseException) -> bool:
    """A bad input the project itself reported: one of `USER_INPUT_ERRORS` raised by a `raise` statement of this
    package (the config's validation, the preflight checks). The same types raised inside a library or a builtin
    (`int("x")`, a numpy shape error) mean a bug, which keeps its traceback."""
    if not isinstance(error, USER_INPUT_ERRORS) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    filename = frame.tb_frame.f_code.co_filename
    line = linecache.getline(filename, frame.tb_lineno).lstrip()
    return any(Path(filename).resolve().is_relative_to(folder) for folder in _package_dirs()) and line.startswith(
        "raise "
    )


def project_error_types() -> tuple[type[BaseException], ...]:
    """The classes of `PROJECT_ERRORS` whose modules are loaded."""
    return tuple(getattr(sys.modules[module], name) for module, name in PROJECT_ERRORS if module in sys.modules)


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "").lower() in ("1", "true", "yes", "on")


def exit_status_of(error: BaseException) -> int | None:
    """2 for a checked bad input, 1 for a project run-time error, `None` for anything else (a bug)."""
    if isinstance(error, project_error_types()):
        return 1
    if is_checked_input_error(error):
        return 2
    return None


def one_line(program: str, error: BaseException) -> str:
    """`<program>: error: <message>` with the message's lines joined (a list of problems stays readable)."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    return f"{program}: error: {message}"


def run_entry_point(program: str, main: Callable[[list[str]], T], argv: list[str] | None = None) -> T:
    """Run `main(argv)` (without `--debug`) and turn the project's errors into one line on stderr and an exit status.

    Args:
        program (`str`): the name the user typed (`dmdr-train`, `dmdr-export`, ...), printed before the message.
        main (`Callable`): the entry point's body; it receives `argv` without `--debug`.
        argv (`list[str]`, *optional*): the arguments (default: `sys.argv[1:]`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return main([arg for arg in argv if arg != DEBUG_FLAG])
    except Exception as error:
        status = exit_status_of(error)
        if debug or status is None:
            raise
        hint = "" if status == 2 else f" (run with {DEBUG_FLAG} or {DEBUG_ENVIRONMENT_VARIABLE}=1 for the traceback)"
        print(one_line(program, error) + hint, file=sys.stderr)  # noqa: T201
        raise SystemExit(status) from None
