#!/usr/bin/env bash
# The main job: installs what is missing, builds, brings up the Soft-RoCE rig and runs the
# verbs latency benchmark side by side with perftest. (The local pmgas cluster joins this
# once the monitor and data servers can allocate.)
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/bench-vs-perftest.sh "$@"
