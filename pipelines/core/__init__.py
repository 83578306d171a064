"""What every other part of the product shares: the label map, the one frame transform, the
codecs, the metrics, pictures for people, job options and the base error.

May import numpy, PIL and PyTorch only (PyTorch lazily where a CPU task must not pay for it);
never Ray, MLflow, storage or anything else of the project's.
"""
