"""Device side of edge-slm-agent: the daemon, its engine, sensors and pack store."""

__version__ = "0.1.0"
