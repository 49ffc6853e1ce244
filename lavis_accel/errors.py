"""The one exception type for bad user input: the CLI prints its message as a single line and exits 2."""


class SettingError(ValueError):
    """A setting, file or input that does not fit; the message names it."""


# Set to 1 to see the traceback behind a one-line error (e.g. of LAVIS's own set-up code).
TRACEBACK_VARIABLE = "LAVIS_ACCEL_TRACEBACK"
