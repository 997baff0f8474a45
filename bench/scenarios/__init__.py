"""What is measured: one module per scenario of ``python -m bench`` (the no-HTTP limit,
``/v1/embed`` against the baselines, search, bulk indexing and its engines, index kinds, the
generator's ceiling, overload, the HTTP front end, side by side and A/B runs, search
quality, replica start, the local cluster), each with a ``measure`` that starts what it
needs and returns its numbers as plain data for results.json. Scenarios import from
``bench.harness`` and each other, never from ``bench.report``: they measure, and render
nothing."""
