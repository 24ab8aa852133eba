"""The operations plane: a running server's patches, seen and switched live.

The engine-side responders the general plugin installs (``agent``), one
process's part of a live change (``control``), the server-wide view and the
all-or-nothing switch the endpoint plugin runs (``fleet``, ``switch``), the
change epoch the API servers of one server share (``epoch``), the
Prometheus metric (``metrics``) and the HTTP client of the CLI (``remote``).
Interface for other wings: ``remote`` (the CLI's client), ``agent``.
"""
