"""The base of every error caused by bad input or configuration (as opposed to a bug).

Jobs print such an error as one line, ``error: <message>``, and exit with status 2, so each
message must name the file/field and say what was expected.
"""


class UserError(ValueError):
    """Bad input, arguments or environment; the message is shown to the user as it is."""
