#!/usr/bin/env bash
# Stop the processes that up.sh started in ${DIR:-$HOME/.distdl/local-cluster}, and nothing else.
set -euo pipefail
exec distdl cluster down --dir "${DIR:-$HOME/.distdl/local-cluster}"
