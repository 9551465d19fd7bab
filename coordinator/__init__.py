"""Shoal's coordinator: a gRPC service backed by Redis (see coordinator/README.md).

One module per concept: ``membership`` (live nodes), ``locations`` (who holds
what), ``leases`` and ``fetches`` (one upstream fetch per key, fenced),
``scheduler`` and ``election`` (the TTL schedule, swept by one leader),
``tags``, ``metrics`` (counters) with ``metrics_server`` (``/metrics``) and
``distinct_bytes`` (the Lua that keeps the distinct bytes cached beside each
meta); ``keys`` names every Redis key; ``servicer`` is the only module that
sees the generated gRPC code; ``server`` runs it all.
"""
