"""Errors the runner reports to users as one line.

Anything raised as a :class:`RunnerError` is a problem with the user's input (spec, names, paths,
store) found before training starts: the CLI prints its message and exits with code 2.
"""

from __future__ import annotations


class RunnerError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback unless ``--debug``."""

    exit_code = 2


class SpecError(RunnerError):
    """The experiment spec is malformed or names something that does not exist."""


class UnknownNameError(RunnerError, KeyError):
    """A registry lookup for a name no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(RunnerError):
    """Two plugins registered the same name."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (pluggy's validation errors span several), at most ``limit`` chars."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PluginError(RunnerError):
    """Plugin code (a builder, a transform) raised; the message names the spec key, the name and the plugin."""


class CorruptImageError(RunnerError):
    """An image file of the dataset cannot be read; the message names the file."""


class StoreError(RunnerError):
    """The results store cannot be opened, is not a runner store, or is too new."""


class RunNotFoundError(RunnerError, KeyError):
    """No run in the store has the given id (or id prefix)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunTakenOver(RunnerError):
    """Another process owns the run now (it resumed the run while this one was paused or cut off).

    This process must stop without writing anything more for the run: exit code 1.
    """

    exit_code = 1

    def __init__(self, run_id: str, by: str | None, deleted: bool = False) -> None:
        what = "was deleted" if deleted else f"was taken over by {describe_owner(by)}"
        super().__init__(f"run {run_id} {what}; stopping without writing")
        self.run_id = run_id


def describe_owner(token: str | None) -> str:
    """``host:pid:nonce`` (an owner token) as ``pid 123 on host``."""
    if not token:
        return "no process (the run is no longer running)"
    host, _, rest = token.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on {host}" if pid.isdigit() else token

