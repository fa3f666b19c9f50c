#!/usr/bin/env bash
# The whole test suite: Rust unit, integration and end-to-end tests, then the Helm chart and
# plain manifests (rendered and validated offline with Helm's Go SDK from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

# e2e tests start the real binaries: build them first (shared with the test build).
cargo build --workspace --bins
cargo test --workspace

venv=target/chart-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.4
"$venv/bin/python" charts/tests/chart.py
