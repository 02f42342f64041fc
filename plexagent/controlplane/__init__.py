"""Talking to the control plane: the HTTP client, the event stream, and sync."""
