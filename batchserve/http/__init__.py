"""The HTTP layer: the v1 routes and the root resource (``v1.py``), the Open Inference
Protocol v2 routes (``v2.py``, wire format in ``v2_wire.py``), what both share per request
(``responder.py``: admission, deadlines, errors, metrics), the wire format of v1 and the
status of every domain error (``wire.py``), how a URL reaches its route, the Twisted site
with its bounded bodies, early refusals and per-request state, body parsing and input
checks, bearer tokens, draining, the search page and the API's contract (``openapi/``).
Imports run one way: v1 -> v2 -> responder -> site, wire and the rest.

It is the only layer that imports Klein or writes JSON. It may import ``serving``, ``models``
and ``storage`` (for their records and limits), never ``bulk``, ``server`` or ``cli``.
"""
