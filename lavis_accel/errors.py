"""The one exception type for bad user input: the CLI prints its message as a single line and exits 2."""


class SettingError(ValueError):
    """A setting, file or input that does not fit; the message names it."""
