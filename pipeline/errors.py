"""The exception family of the package.

AnnotateError          base; caught only in cli
├── ConfigError        bad YAML, unknown key, bad --set, unset key variable; names the field; exit 2
├── ManifestError      manifest missing or unreadable, column absent, duplicate ids; exit 2
├── StoreError         output directory unusable
├── RunStopped         the run cannot usefully go on (the same account-level error again and again); exit 1
├── Interrupted        SIGINT or SIGTERM: what was received is on disk; exit 130
├── RowInputError      one row's image or prompt unusable: missing file, not an image, null ref
└── RequestFailed      one row's request failed; carries .status and .attempts
    ├── Retryable      408, 409, 429 (with .retry_after_s), 5xx, timeouts, dropped connections, bad bodies
    └── Rejected       other 4xx: final

The first four stop the run; the last two become error rows.
"""

from __future__ import annotations

__all__ = [
    "AnnotateError",
    "ConfigError",
    "ManifestError",
    "StoreError",
    "RunStopped",
    "Interrupted",
    "RowInputError",
    "RequestFailed",
    "Retryable",
    "Rejected",
]


class AnnotateError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(AnnotateError):
    pass


class ManifestError(AnnotateError):
    pass


class StoreError(AnnotateError):
    pass


class RunStopped(AnnotateError):
    pass


class Interrupted(AnnotateError):
    pass


class RowInputError(AnnotateError):
    """`retryable`: the cause may pass (a remote image's host timed out), so the next run asks again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Halted(AnnotateError):
    """The run is stopping: a request was not sent, and its row stays to do."""


class RequestFailed(AnnotateError):
    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class Retryable(RequestFailed):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, status=status, attempts=attempts)
        self.retry_after_s = retry_after_s


class Rejected(RequestFailed):
    pass
