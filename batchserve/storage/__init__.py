"""Storage: the FAISS index (``index.py``, with several rows per item in
``viewed_index.py``), the item store that keeps index, catalog and filters in step
(``store.py``, opened for a data dir by ``data_dir.py``), the ``Catalog`` protocol
(``catalog.py``) and its two implementations, embedded SQLite (``sqlite.py``) and shared
PostgreSQL (``postgres.py``), and the item records (``records.py``).

It knows nothing of HTTP or the model's framework. It may import ``models`` (the embedding
recipe it fingerprints), never ``serving``, ``http``, ``bulk``, ``server`` or ``cli``.
"""
