"""The one exception bad data raises, so callers (the CLI) can print its single line instead of a traceback."""


class DataError(ValueError):
    """Bad input data or data settings; the message names the source, the record and what was expected."""
