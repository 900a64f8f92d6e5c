"""Exception types. Each docstring is the default message."""

from __future__ import annotations


class RelayError(Exception):
    """relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(RelayError):
    """The configuration is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems) if problems else None)


class NotMigrated(RelayError):
    """The database schema is missing or out of date: run `relay migrate` first."""


class NotFound(RelayError):
    """No such object."""


class Conflict(RelayError):
    """That object exists already."""


class StoreUnavailable(RelayError):
    """The database could not be reached."""


class StorageFull(StoreUnavailable):
    """The database's disk is full."""


class LeaseLost(RelayError):
    """Another worker took this recipient's lease."""
