#!/usr/bin/env bash
# Writes deploy/startup/symbols.txt: the functions an idle `renderq worker`
# and an idle `renderq serve` run (the shipped workers.toml: the embedded
# queue), as callgrind sees them in the current release build. build.rs asks the
# linker to put them first in the executable's text, together, so that an
# idle process maps a few hundred KiB of its code rather than pages from
# all over 38 MB (see README, "Benchmarks": idle resident memory).
#
# Run after changes that move start-up code or change dependencies, then
# rebuild (`cargo build --release` relinks). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release
bin=$PWD/target/release/renderq
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The shipped workers.toml, on a port of its own (the bench's bare config
# runs a subset of what it does).
sed 's/^listen = "127.0.0.1:8080"/listen = "127.0.0.1:0"/' workers.toml >"$work/workers.toml"
for mode in worker serve; do
    # Idle for a while under callgrind (about 50 times slower), then
    # stopped. %p: the reaper is a forked process of its own.
    (cd "$work" && RUST_LOG=warn timeout -s TERM 30 valgrind --tool=callgrind \
        --separate-threads=yes --demangle=no --compress-strings=no \
        --callgrind-out-file="$work/cg.$mode.%p" "$bin" "$mode" \
        --config workers.toml >"$work/$mode.log" 2>&1) || true
done
nm --defined-only "$bin" | awk '$2 ~ /^[tT]$/ {print $3}' | LC_ALL=C sort -u >"$work/defined"
sed -n 's/^c\?fn=//p' "$work"/cg.* | LC_ALL=C sort -u >"$work/run"
LC_ALL=C comm -12 "$work/defined" "$work/run" >deploy/startup/symbols.txt
echo "$(wc -l <deploy/startup/symbols.txt) functions in deploy/startup/symbols.txt"
