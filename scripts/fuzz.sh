#!/usr/bin/env bash
# A short, bounded fuzzing run of both cargo-fuzz targets (default 30 s each).
# Installs cargo-fuzz when missing. Works on stable through RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../crates/icache"
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in decode rewrite; do
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
