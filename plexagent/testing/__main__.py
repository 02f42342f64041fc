"""``python -m plexagent.testing``: the control-plane simulator as a local control plane (``plexagent.testing.cli``)."""

import sys

from plexagent.testing.cli import main

sys.exit(main(prog="python -m plexagent.testing"))
