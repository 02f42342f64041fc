"""plexagent: the node agent (Local Node API and Node Agent API)."""

__version__ = "0.1.0"
