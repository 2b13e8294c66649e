"""Benchmark harness of runner_mw (run ``bench/run``; see ``bench/README.md``). Not a test suite."""
