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


# Ray's memory monitor kills a worker when its node's memory is nearly full; the report then
# says so in the middle of some forty lines about the worker and the object store.
_OUT_OF_MEMORY = "killed due to the node running low on memory"
_MEMORY_USE = re.compile(r"was ([\d.]+GB used / [\d.]+GB limit)")


def failure_line(exc: BaseException) -> str:
    """One line for a failure reported by Ray.

    A worker killed for memory says so; otherwise the report's error line, else its first
    statement: Ray's reports open with headers ("Training failed due to worker errors:",
    "[Rank 1 Error Snippet]:") that name no cause.
    """
    text = str(exc).strip()
    if _OUT_OF_MEMORY in text:
        use = _MEMORY_USE.search(text)
        usage = f" ({use.group(1)})" if use else ""
        return (f"Ray killed a worker as its node ran out of memory{usage}; choose a smaller "
                "model, batch or image size, or fewer workers or replicas per node")
    statements = [line.strip() for line in text.splitlines()
                  if line.strip() and not line.strip().endswith(":")]
    return error_line(text) or (statements[0] if statements else type(exc).__name__)
