"""The error types the bundle runtime raises; kiln.errors builds the pipeline's error family on top of them."""


class KilnError(Exception):
    """A problem the user can act on. The message says what is wrong and what to do."""


class IntegrityError(KilnError):
    """A persisted file does not match the sha256 its manifest recorded (corrupted or tampered)."""


class BundleError(KilnError):
    """A deployment bundle is missing files, malformed or fails its manifest checks."""
