#!/usr/bin/env bash
# `cargo leptos end-to-end`, failing unless Playwright itself reports its tests passed: cargo-leptos
# exits 0 when the server fails to build or link (seen when the disk filled up), so its exit status
# alone would call a run that never started "passed".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo leptos end-to-end 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
if grep -Eq '^ +[0-9]+ (failed|flaky)' "$log" || ! grep -Eq '^ +[0-9]+ passed' "$log"; then
    echo "end-to-end: Playwright did not report a passing run (see above)" >&2
    exit 1
fi
