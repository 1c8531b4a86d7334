"""Errors that mean "the input is wrong", not "the code is wrong": the CLI prints them as one line, exit 2."""


class UserInputError(Exception):
    """Bad input from the user: a path, a file, an option value."""


class ConfigError(UserInputError, ValueError):
    """An adapter configuration value that cannot work."""


class AdapterFileError(UserInputError, ValueError):
    """A file that is not a usable MoSLoRA adapter for this model; raised before anything is changed."""
