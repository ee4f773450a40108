"""distdl: distributed deep-learning training and inference on Ray."""

__version__ = "0.1.0"
