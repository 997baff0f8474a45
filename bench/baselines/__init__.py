"""The usual alternatives to batchserve, served by gunicorn for comparison:

- ``flask_predict``: Flask calling ``model.predict`` on one image per request, as most
  tutorials and teams deploy a Keras model;
- ``flask_function``: the strongest per-request deployment: Flask calling a compiled
  ``tf.function`` (fixed uint8 signature, normalisation in the graph) at batch 1.

Both decode with the same code as batchserve and answer the same JSON as ``/v1/embed``.
"""
