"""One exception family per kind of failure; every message names the problem and the fix.

The three a deployment bundle can raise at run time are defined in kiln.runtime.errors, which bundles ship.
"""

from kiln.runtime.errors import BundleError, IntegrityError, KilnError

__all__ = ["BundleError", "ConfigError", "DataError", "DownloadError", "ExportError", "GateFailed", "IntegrityError",
           "KilnError", "StorageFull", "ValidationFailed"]  # fmt: skip


class ConfigError(KilnError):
    """The pipeline configuration (YAML, --set, profile) is invalid."""


class DataError(KilnError):
    """The dataset is missing, empty, unreadable or unsafe (e.g. an archive escaping its folder)."""


class DownloadError(KilnError):
    """A transient network failure while downloading; the download task retries on this type only."""


class ValidationFailed(KilnError):
    """Data validation (Great Expectations) found failed expectations."""


class GateFailed(KilnError):
    """The trained model did not pass the evaluation gate (e.g. accuracy below evaluate.min_accuracy)."""


class StorageFull(KilnError):
    """The disk (or quota) under store.root filled up while a stage wrote its output; nothing was published."""


class ExportError(KilnError):
    """An exported or compressed model failed its own checks (checker, parity, re-evaluation)."""
