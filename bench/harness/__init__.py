"""What the scenarios measure with: the asyncio HTTP client, request bodies, open- and
closed-loop load, one measured point with the server's own ``/metrics`` view, the processes
under test (``ServerProcess``, also the integration tests' harness, the gunicorn baselines,
memory and per-thread CPU from ``/proc``), the benchmark images, and filling a data dir
with synthetic vectors. It imports ``batchserve`` and nothing else of ``bench``."""
