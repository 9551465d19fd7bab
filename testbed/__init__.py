"""The test bed: the real processes, registries and images that tests and the benchmark run against.

Both ``tests/`` and ``bench/`` import it; ``bench/`` never imports
``tests/``. It holds no test of its own (``tests/test_testbed.py`` proves it)
and nothing of the product: ``shoal up`` lives in ``shoal/up.py``.
"""
