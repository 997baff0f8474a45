"""Storage: the FAISS index (``index.py``, with several rows per item in
``viewed_index.py``), the item store that keeps index, catalog and filters in step
(``store.py``), a data dir's settings, lock and replica id (``data_dir.py``), the
``Catalog`` protocol (``catalog.py``) and its two implementations, embedded SQLite
(``sqlite.py``) and shared PostgreSQL (``postgres.py``, with its schema in
``postgres_schema.py``, its change listener in ``listener.py`` and the client-side bound on
every wait in ``watchdog.py``), how a replica says the shared catalog is out of reach
(``outage.py``), and the item records (``records.py``).

It knows nothing of HTTP or the model's framework. It may import ``models`` (the embedding
recipe it fingerprints), never ``serving``, ``http``, ``bulk``, ``server`` or ``cli``.
"""
