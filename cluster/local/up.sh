#!/usr/bin/env bash
# Start a head and ${1:-2} worker nodes on 127.0.0.1; state in ${DIR:-$HOME/.distdl/local-cluster}.
set -euo pipefail
exec distdl cluster up --workers "${1:-2}" --dir "${DIR:-$HOME/.distdl/local-cluster}"
