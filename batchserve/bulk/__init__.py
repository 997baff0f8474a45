"""``batchserve index``: bulk indexing of folders and manifests of images. Which engine runs
a job (``command.py``), what it reads (``sources.py``), the local engine (``local.py``) and
the Ray Data engine (``ray_engine.py``, with what runs on Ray's workers in
``ray_stages.py``), where the embeddings go (``outputs.py``), the job the engines run and
the settings that are bulk's own (``settings.py``: config.py's ``BulkSettings`` makes the
``BulkJob``), and its report.

It uses ``models`` and ``storage`` as the server does, and never imports ``http``,
``serving``, ``server``, ``config`` or ``cli``.
"""
