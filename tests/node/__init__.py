"""Tests of the Local Node API and its stores (plexagent.node)."""
