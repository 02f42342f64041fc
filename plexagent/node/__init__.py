"""The Local Node API: its routes, the node state cache, the report store and secrets."""
