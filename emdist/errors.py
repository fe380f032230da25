"""Exception types that carry an exit status.

User errors (bad data, bad option values) exit with 2 and print one line; runtime
failures (an unreachable scheduler, a shard that keeps failing) exit with 1.
"""

from __future__ import annotations


class EmdistError(Exception):
    """Base class of the errors emdist reports without a traceback."""

    exit_code = 1


class UserError(EmdistError):
    """Bad input or option values: the user can fix it. Exit status 2."""

    exit_code = 2


class DataError(UserError):
    """A Kaldi data dir file is malformed.

    The message names the file and, where there is one, the line:
    ``data/train/text:12: duplicate utterance id 'a1' (ids must be unique)``.
    """

    def __init__(self, path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.message = message
        self.line = line

    def __reduce__(self):  # exceptions cross process boundaries (Dask workers)
        return (type(self), (self.path, self.message, self.line))


class RuntimeFailure(EmdistError):
    """A failure of the run rather than of its input. Exit status 1."""

    exit_code = 1


class WriteFailure(RuntimeFailure):
    """A file could not be written (no space left, no permission, a read-only file system).
    The message names the file; ``kept`` is filled in by whoever knows what stays intact
    (the exp dir's last complete model). Exit status 1."""

    def __init__(self, path, reason: str, kept: str = "") -> None:
        self.path, self.reason, self.kept = str(path), reason, kept
        tail = f"; {kept}" if kept else ""
        super().__init__(f"cannot write {path}: {reason}{tail}")

    def with_kept(self, kept: str) -> WriteFailure:
        return WriteFailure(self.path, self.reason, kept)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.kept))


class ClusterLost(RuntimeFailure):
    """The Dask scheduler or every worker went away mid-run and did not come back within
    ``--wait-timeout``. Like :class:`WriteFailure`, ``kept`` says what stays intact. Exit
    status 1."""

    def __init__(self, what: str, kept: str = "") -> None:
        self.what, self.kept = what, kept
        super().__init__(f"{what}; {kept}" if kept else what)

    def with_kept(self, kept: str) -> ClusterLost:
        return ClusterLost(self.what, kept)

    def __reduce__(self):
        return (type(self), (self.what, self.kept))


class EmdistWarning(UserWarning):
    """Base class of emdist's warnings (the test suite turns them into errors)."""
