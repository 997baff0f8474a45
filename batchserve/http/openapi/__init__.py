"""The API's contract: the OpenAPI 3.1 document of every route (``document.py``), its
schemas (``schemas.py``) and the HTML reference rendered from it at ``/docs``
(``docs_page.py``). Part of the HTTP layer; it reads the limits the handlers enforce."""
