"""Errors that end a run with one clear line instead of a traceback."""


class SsatError(Exception):
    """A problem with the user's input (config, data, files): printed as one line, exit code 2."""


class ConfigError(SsatError):
    """A config value outside what is allowed; the message names the key, the value and what is allowed."""


class DataError(SsatError):
    """A data set or pool that is missing, empty or malformed."""
