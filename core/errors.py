"""Errors users see: each message is one sentence saying what is wrong and what to do."""


class FastgenError(Exception):
    """Base of every error fastgen raises on purpose."""


class ConfigError(FastgenError, ValueError):
    """A setting is unknown or out of range."""


class PluginError(FastgenError):
    """A plugin is unknown, failed to load, clashes with another, or cannot run here."""


class ModelLoadError(FastgenError):
    """A checkpoint is missing, incomplete or of an architecture no plugin serves."""


class RequestError(FastgenError, ValueError):
    """A request cannot be served as given (too long, bad sampling parameters, ...).

    `param` names the request field at fault, when there is one, for transports to report.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
