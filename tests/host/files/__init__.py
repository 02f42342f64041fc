"""Tests of the host file operations (plexagent.host.files)."""
