"""The one exception type for mistakes a user can fix."""

import re

# argparse's one line for a usage mistake (cli._Parser): "distdl train: error: MESSAGE".
_USAGE_ERROR = re.compile(r"^distdl( [\w -]+)?: error: ")


class UserError(Exception):
    """A problem in the user's input: the CLI prints the message on one line and exits with 2."""


def error_line(text: str) -> str | None:
    """The last error line of a log or of Ray's multi-line failure report, if there is one.

    That is distdl's own "error: ..." line, argparse's "distdl train: error: ..." line (a
    usage mistake in a job's command) or an exception's "SomeError: ..." line.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if (line.startswith("error:") or _USAGE_ERROR.match(line)
                or line.split(":")[0].endswith(("Error", "Exception"))):
            return line
    return None


def failure_line(exc: BaseException) -> str:
    """One line for a failure reported by Ray: its error line, else its first line."""
    text = str(exc).strip()
    return error_line(text) or (text.splitlines()[0] if text else type(exc).__name__)
