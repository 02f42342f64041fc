#!/usr/bin/env bash
# Sets up plexagent in a virtualenv (.venv) and runs the demo: the bundled
# control-plane simulator serving the Local Node API guide's example node,
# and an agent whose socket and data live in ./demo-run. No root needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python -m plexagent.demo --dir demo-run "$@"
