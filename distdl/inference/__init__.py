"""Serving: the Predictor, the Ray Serve application, its configs, and a client.

The batching defaults live here, where the CLI, the Serve configs and the replicas all read
them without importing the rest. On CPU a forward pass costs little less per image past 16
images (ResNet-18 at 32x32, 2 threads, in a plain process: 6.3, 6.5 and 6.8 ms per image at 8,
16 and 32; with the replicas' passive OpenMP threads 8.4, 7.5 and 7.0), so larger batches
mostly add waiting. And a batch that fills goes at once, while one that cannot fill waits out
BATCH_WAIT_MS: with 16 clients through HAProxy (three alternated rounds), ResNet-18 at a 15 ms
wait gave 109.0, 115.1 and 107.0 requests/s at 16 against 92.6, 104.8 and 94.8 at 32. GPU
replicas gain from larger batches: raise `--max-batch-size` there.
"""

MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 5.0
