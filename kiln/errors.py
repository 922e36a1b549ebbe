"""One exception family per kind of failure; every message names the problem and the fix."""


class KilnError(Exception):
    """A problem the user can act on. The message says what is wrong and what to do."""


class ConfigError(KilnError):
    """The pipeline configuration (YAML, --set, profile) is invalid."""


class DataError(KilnError):
    """The dataset is missing, empty, unreadable or unsafe (e.g. an archive escaping its folder)."""


class DownloadError(KilnError):
    """A transient network failure while downloading; the download task retries on this type only."""


class IntegrityError(KilnError):
    """A persisted file does not match the sha256 its manifest recorded (corrupted or tampered)."""


class ValidationFailed(KilnError):
    """Data validation (Great Expectations) found failed expectations."""


class GateFailed(KilnError):
    """The trained model did not pass the evaluation gate (e.g. accuracy below evaluate.min_accuracy)."""


class ExportError(KilnError):
    """An exported or compressed model failed its own checks (checker, parity, re-evaluation)."""


class BundleError(KilnError):
    """A deployment bundle is missing files, malformed or fails its manifest checks."""
