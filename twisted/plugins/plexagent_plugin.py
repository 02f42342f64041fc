"""twistd plugin: ``twistd -n --pidfile= plexagent --config FILE``."""

from twisted.application.service import ServiceMaker

plexagent = ServiceMaker(
    "plexagent",
    "plexagent.tap",
    "The plexagent node agent (Local Node API and Node Agent API).",
    "plexagent",
)
