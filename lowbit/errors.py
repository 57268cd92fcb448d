"""The one exception type users see.

Every failure caused by bad input (a missing file, a corrupt checkpoint, an unsupported setting)
is raised as :class:`LowbitError` with a one-line message that names the file or argument.
The CLI prints ``lowbit: error: <message>`` and exits with status 2; it never shows a traceback
for these.
"""


class LowbitError(Exception):
    """A user-facing error: one line, naming the file or argument at fault."""
