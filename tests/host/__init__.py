"""Tests of the host operations (plexagent.host)."""
