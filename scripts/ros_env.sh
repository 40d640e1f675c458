#!/usr/bin/env bash
# Run a command with DDS traffic confined to loopback: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a ROS_DOMAIN_ID
# of its own (from the PID unless set) and the project's Fast DDS profile (127.0.0.1 only, 32 MB shared memory).
# Used by `make demo` and `make test`; the tests set the same again themselves (test/conftest.py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ( $$ % 90 ) + 10 ))}"
export FASTDDS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_localhost.xml"
echo "[ros_env] ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=$ROS_DOMAIN_ID (loopback only)" >&2
exec "$@"
