#!/usr/bin/env bash
# The project's test command (README "Set-up"): builds the plugin libraries the
# dynamic-loading tests load, then runs every test of the workspace.
# PROPTEST_CASES caps property-test cases (CI sets it lower; default 64 here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-64}"
cargo test --workspace "$@"
