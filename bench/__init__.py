"""Shoal's benchmark harness: Shoal against the distribution proxy and nginx, on loopback.

``python -m bench`` starts everything it measures (see ``bench/stack.py``),
runs the scenarios in ``bench/scenarios/``, stops every process it started,
and writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``. ``--quick``
does the same with tiny sizes and one run, for the test suite.
"""
