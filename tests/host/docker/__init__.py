"""Tests of the Docker package (plexagent.host.docker)."""
