#!/usr/bin/env bash
# Nodes and resources of the cluster in ${DIR:-$HOME/.distdl/local-cluster}.
set -euo pipefail
exec distdl cluster status --dir "${DIR:-$HOME/.distdl/local-cluster}"
