"""Models: what a model is (``spec.py``: its source, input size, heads and fingerprint),
reading each kind of source (``loaders.py``) into one compiled function (``compiled.py``),
the directory ``batchserve train`` writes, decoding images to the model's input
(``images.py``), the embedding recipe's item views (``views.py``) and padding batches
(``batches.py``). numpy in, numpy out; TensorFlow is imported lazily, on the model's thread.

It imports no other layer of batchserve (only ``errors`` and ``settings``).
"""
