"""The base class of every error a user can fix by changing a config, a path or an input.

main.py prints such errors as one line (no traceback) and exits non-zero; everything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: the message names the culprit (config key, parameter path, file, shape) and the fix."""


class DataError(UserError):
    """A dataset, split, folder or selection that cannot be served; the message says how to fix it."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key (config_lib and the families raise it)."""
