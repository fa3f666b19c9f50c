#!/usr/bin/env bash
# Quick start without Kubernetes: builds ferromq and runs deploy/examples/sync-double-write.yaml
# (2 masters x 1 slave, sync double write) as local processes with `operator local`, which
# checks a produce/consume round trip and keeps the cluster running until Ctrl-C.
# Edit the file (e.g. masters: 3) while it runs to scale.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-deploy/examples/sync-double-write.yaml}
echo "building (the first build takes a few minutes)..."
cargo build --release --bins -p broker -p operator
exec target/release/operator local "$FILE"
