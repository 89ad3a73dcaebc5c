"""User-facing errors: what went wrong, where, and how to fix it.

Every problem a user can cause (a bad recipe, a missing data path, a damaged checkpoint) is
raised as a `FlslError` and rendered once, at the CLI boundary, as a short message with a
non-zero exit code and no traceback. A `FlslError` pickles intact, which is how it crosses from
one process to another.
"""

from __future__ import annotations

from typing import Any


class FlslError(Exception):
    """An error the user can fix. `what` says what is wrong, `where` names the file/key/path,
    `fix` says what to do about it."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: {self.what}")
        else:
            parts.append(self.what)
        if self.fix:
            parts.append(self.fix)
        return " ".join(p.rstrip() if p.rstrip().endswith(".") else p.rstrip() + "." for p in parts)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (message, `where`, `fix`, exit code and any fields of a subclass), so
        that an error raised in another process (a spawned rank, a data worker, a pool worker)
        is raised again here as itself."""
        return _restore, (type(self), self.args, dict(self.__dict__))


def _restore(cls: type[FlslError], args: tuple, state: dict) -> FlslError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


def first_line(exc: BaseException) -> str:
    """An exception's type and the first line of its message, for a reason quoted to the user
    ("OSError: image file is truncated")."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class RecipeError(FlslError):
    """The recipe (or a --set override) is invalid. Holds every problem found, each naming its
    key and what to write instead; `recheck` is the command that checks the recipe again."""

    recheck: str | None = None

    def __init__(self, problems: list[str], *, source: str) -> None:
        self.problems = problems
        self.source = source
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} problem(s) in the recipe:\n{listing}\n",
            where=source,
            fix="Edit the recipe or the --set values and run `flsl recipe validate` again",
        )


class DataError(FlslError):
    """Training or evaluation data is missing, empty or unreadable."""


class CheckpointError(FlslError):
    """A checkpoint is missing, incomplete, damaged or unsafe to load."""


class RunDirError(FlslError):
    """The run directory cannot be used for this run."""


class RunStopped(FlslError):
    """The run stopped on request (a stop signal: SIGTERM, SIGUSR2, SIGHUP; Ctrl-C exits 130)
    after saving the step it reached."""

    exit_code = 75

    def __init__(
        self, what: str, *, step: int, signal_name: str, where: str | None = None, fix: str | None = None
    ) -> None:
        self.step = step
        self.signal_name = signal_name
        if signal_name == "SIGINT":
            self.exit_code = 130
        super().__init__(what, where=where, fix=fix)


class TrainingDiverged(FlslError):
    """The loss became non-finite."""

    exit_code = 3
