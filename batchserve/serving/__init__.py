"""The serving core, one request's way from the HTTP layer to the model and the index and
back: the reactor-side service (``service``) and what it runs on the decode pool
(``decoding``, its images taking turns: ``turns``) and on the store thread
(``store_calls``), the batcher, the pipeline's two
stages (the inference thread that owns the model, the store thread that owns the item store),
the follower that keeps a replica current, and the metrics, logs and timings they report.

It knows nothing of HTTP or SQL. It may import ``models`` and ``storage``, never ``http``,
``bulk``, ``server`` or ``cli``.
"""
