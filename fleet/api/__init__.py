"""The fleet's HTTP API (FastAPI) and its command-line client.

auth.py     bearer tokens from a file of SHA-256 hashes, roles ``read`` and ``admin``
params.py   query parameters -> validated values (times, durations, sizes), stable error codes
app.py      the FastAPI application over a TelemetryStore: registry, series, gaps, summary
client.py   the small urllib client the ``edge-fleet devices|device show|metrics`` commands use

The API only reads the store, apart from the admin ``retention/prune`` call, and holds no
state of its own, so several service processes can serve one PostgreSQL database.
"""
