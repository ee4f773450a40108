"""Serving: the Predictor, the Ray Serve application, its configs, and a client.

The batching defaults live here, where the CLI, the Serve configs and the replicas all read
them without importing the rest. On CPU a forward pass costs little less per image past 16
images (ResNet-18 at 32x32, 2 threads, in a plain process: 6.3, 6.5 and 6.8 ms per image at 8,
16 and 32; with the replicas' passive OpenMP threads 8.4, 7.5 and 7.0), so larger batches
mostly add waiting. And a batch that fills goes at once, while one that cannot fill waits out
BATCH_WAIT_MS: with 16 clients through HAProxy (three alternated rounds), ResNet-18 at a 15 ms
wait gave 109.0, 115.1 and 107.0 requests/s at 16 against 92.6, 104.8 and 94.8 at 32. GPU
replicas gain from larger batches: raise `--max-batch-size` there.

How long a batch waits to fill is "auto" by default: as long as one forward pass of a lone
image takes in the replica, within AUTO_WAIT_MS. Waiting costs a lone request at most its own
forward pass again, while under load it lets the requests answered by one pass come back in
time to join the next: a short wait splits the clients into groups that alternate in smaller
batches (README, Benchmark). A model of about a millisecond per pass gets the low bound, as
waiting longer than its pass pays only when batches fill.
"""

import math

MAX_BATCH_SIZE = 16
TOP_K = 5  # classes (with probabilities) per prediction; a serve config's args.top_k changes it
BATCH_WAIT_MS: float | str = "auto"
AUTO_WAIT_MS = (5.0, 50.0)  # the bounds of an "auto" batch wait


def auto_batch_wait_ms(lone_pass_ms: float) -> float:
    low, high = AUTO_WAIT_MS
    return min(max(lone_pass_ms, low), high)


def parse_batch_wait(text: str) -> float | str:
    """"auto", or milliseconds >= 0 (a command-line value or a config's)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"batch wait must be 'auto' or milliseconds, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"batch wait must be 'auto' or milliseconds >= 0 (finite), got {text!r}")
    return value
