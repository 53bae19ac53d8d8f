"""Seeing what runs: Prometheus metrics, health endpoints and the live web console of a runtime.

Nothing here is imported unless a listener is asked for (``protofly runtime serve --metrics/--console``,
``protofly demo --console``): :mod:`protofly.observe.server` starts the listeners, :mod:`.metrics` renders
the metrics, :mod:`.console` serves the read-only console and pushes the runtime's events to it.
"""
