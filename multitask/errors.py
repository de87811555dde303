"""User-facing errors: each carries a one-line message that names the file, key or line at fault."""


class MultitaskError(Exception):
    """Base for mistakes a user can fix; the CLI prints the message alone, without a traceback."""


class ConfigError(MultitaskError):
    """A task or experiment YAML (or a --set override) is invalid."""


class DataError(MultitaskError):
    """A data file is missing or malformed."""


class UnsupportedModelError(MultitaskError):
    """The encoder architecture cannot receive deep prefixes."""


class CheckpointError(MultitaskError):
    """A saved run cannot be loaded as asked (missing files, different encoder)."""
