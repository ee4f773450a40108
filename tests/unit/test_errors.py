"""One line out of Ray's multi-line failure reports."""

from distdl.errors import failure_line

# The shape of Ray Train's report of a worker that Ray's memory monitor killed (abridged).
_KILLED_FOR_MEMORY = """Training failed due to worker errors:
[Rank 1 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, dc9c7f4a359e6a8f6661f9d501000000),
)
3 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, ID: 2f14) was 22.96GB used / 23.54GB limit (0.975272)
OOM kill reason: Memory usage 24239071232B exceeded threshold of 24012677120B
Object store memory usage: [- objects spillable: 9
- bytes spillable: 165306]
"""


def test_a_worker_killed_for_memory_is_named_with_the_nodes_use():
    line = failure_line(RuntimeError(_KILLED_FOR_MEMORY))
    assert line.startswith("Ray killed a worker as its node ran out of memory "
                           "(22.96GB used / 23.54GB limit); choose a smaller model")


def test_the_error_line_wins_over_the_reports_headers():
    text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most "
            "recent call last):\n  File \"x.py\", line 1\nValueError: no such column 'labels'\n")
    assert failure_line(RuntimeError(text)) == "ValueError: no such column 'labels'"


def test_without_an_error_line_the_first_statement_after_the_headers():
    text = "Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nA worker health check failed.\nWorker info: Worker(\n"
    assert failure_line(RuntimeError(text)) == "A worker health check failed."
    assert failure_line(RuntimeError("")) == "RuntimeError"
