"""Exception types that carry meaning across the package."""


class SpelaTransferError(Exception):
    """Base class for errors that the command line reports as one line, without a traceback."""


class CacheMismatchError(SpelaTransferError, ValueError):
    """Cached features were made with other settings than the request specifies."""


class CacheCorruptError(SpelaTransferError, ValueError):
    """A cache folder is incomplete, damaged or written by another format version."""


class BackboneUnavailableError(SpelaTransferError, RuntimeError):
    """Pretrained weights for a backbone cannot be loaded on this machine."""
