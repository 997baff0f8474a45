"""``--workers N``: HTTP edge processes in front of one model core. The core's side
(``supervisor``: the processes and sockets; ``core``: each edge's channel, run on the
core's Batcher and store), the edge's side (``edge``: its service's queue, model, store and
metrics through the core; ``edge_main``: the edge process), the channel's frames
(``frames``), and the HTTP front either kind of process serves (``front``).

It may import ``config``, ``http``, ``serving``, ``storage`` and ``models``; only
``server`` imports it.
"""
