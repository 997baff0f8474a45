"""What is reported: ``results.json`` read and written (``results``), its sections rendered
into ``RESULTS.md`` and the README's headline and benchmark lines (``render`` and the
``sections*`` modules), and the PNG plots (``plots``). Nothing here measures, and nothing
is read back from markdown; it may import a scenario's constants (names, flags) from
``bench.scenarios``, and is imported only by the commands (``bench.commands``,
``bench.device_command``) and the tests."""
