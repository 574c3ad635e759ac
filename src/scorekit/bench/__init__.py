"""Benchmarks on exact targets. Each module here defines ``add_arguments(parser)`` and ``run(args)``
and is listed in ``scorekit.cli.bench.BENCHES``; results are printed and saved as JSON (and PNG)."""
