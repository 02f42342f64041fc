#!/usr/bin/env bash
# The test command: sets up everything the suite needs (scripts/setup-test-env.sh),
# runs the whole trial suite, and ends with one line "N passed, N failed".
# Usage: scripts/test.sh [trial test names...]   (default: tests)
set -uo pipefail
cd "$(dirname "$0")/.."

env_lines=$(bash scripts/setup-test-env.sh) || { echo "0 passed, 1 failed"; exit 1; }
eval "$env_lines"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tests)

out=$(mktemp)
python3 -m twisted.trial --temp-directory="${TMPDIR:-/tmp}/plexagent-trial-$$" "${targets[@]}" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}

summary=$(grep -E '^(PASSED|FAILED) \(' "$out" | tail -n 1)
count() { echo "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 | head -n 1; }
passed=$(count successes); passed=${passed:-0}
failed=0
for k in failures errors unexpectedSuccesses; do
    n=$(count "$k"); failed=$((failed + ${n:-0}))
done
skipped=$(count skips); skipped=${skipped:-0}
if [ -z "$summary" ]; then
    failed=$((failed + 1))
fi
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1
fi
rm -f "$out"
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
