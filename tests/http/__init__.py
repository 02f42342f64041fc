"""Tests of the shared HTTP plumbing (plexagent.http)."""
