"""batchserve: an image-embedding and visual-search server that batches requests.

HTTP requests (Klein on Twisted) put decoded images on a queue; a batcher hands whole batches
to one long-lived TensorFlow inference thread; results go back to each waiting request.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
