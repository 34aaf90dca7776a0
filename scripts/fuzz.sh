#!/usr/bin/env bash
# Runs the fuzz targets under fuzz/ (cargo-fuzz, libFuzzer, nightly toolchain)
# for SECONDS each, every target or the ones named, one after another:
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# RUNS=N stops a target after N executions if that comes first (the bar is
# 10 million executions or one hour: RUNS=10000000 scripts/fuzz.sh 3600).
#
# Caps, the same for every target (fuzz/README.md):
#   -rss_limit_mb=2048     the whole process stays under 2 GiB resident;
#   -malloc_limit_mb=512   no single allocation over 512 MiB;
#   -timeout=10            no input takes over 10 s.
# Going over a cap counts as a finding, like a crash.
#
# Seeds are read from fuzz/corpus/TARGET (committed, never written to); what
# the fuzzer learns goes to fuzz/grown/TARGET, findings to fuzz/artifacts/TARGET,
# the full libFuzzer output to fuzz/logs/TARGET.log (all three git-ignored).
# Prints per target the executions, seconds, executions per second and what it
# found; exits 1 if any target found anything, 2 on a usage or build error.
#
# Environment: CARGO_BUILD_JOBS (default 1), NICE (default 5: the fuzzer
# yields to other work). One fuzzing process at a time.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

RSS_LIMIT_MB=2048
MALLOC_LIMIT_MB=512
TIMEOUT_S=10

usage() {
    echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2
    echo "targets: $(ls fuzz_targets | sed 's/\.rs$//' | tr '\n' ' ')" >&2
    exit 2
}
[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -gt 0 ]] || usage
secs=$1
shift
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
for t in "${targets[@]}"; do
    [[ -f "fuzz_targets/$t.rs" ]] || { echo "no fuzz target '$t'" >&2; usage; }
done

nice_n=${NICE:-5}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
# The CPU backend without oneDNN: nothing loaded at run time, same bits.
export ECDIT_ONEDNN=off

echo "building ${#targets[@]} fuzz target(s) (cargo +nightly fuzz build)..."
for t in "${targets[@]}"; do
    nice -n "$nice_n" cargo +nightly fuzz build "$t" || { echo "build of $t failed" >&2; exit 2; }
done
bin_dir=target/x86_64-unknown-linux-gnu/release

mkdir -p logs
found=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "grown/$t" "artifacts/$t" "corpus/$t"
    log="logs/$t.log"
    echo "fuzzing $t for ${secs}s (log: fuzz/$log)..."
    start=$(date +%s)
    nice -n "$nice_n" "$bin_dir/$t" "grown/$t" "corpus/$t" \
        -max_total_time="$secs" \
        ${RUNS:+-runs="$RUNS"} \
        -rss_limit_mb="$RSS_LIMIT_MB" \
        -malloc_limit_mb="$MALLOC_LIMIT_MB" \
        -timeout="$TIMEOUT_S" \
        -artifact_prefix="artifacts/$t/" \
        -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    # libFuzzer's last word: "Done N runs in S second(s)", or on a finding the
    # final stats (-print_final_stats) and the last "#N" status line.
    runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -1)
    [[ -n "$runs" ]] || runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)
    [[ -n "$runs" ]] || runs=$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
    runs=${runs:-0}
    rate=$(( took > 0 ? runs / took : runs ))
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    if [[ $rc -eq 0 && -z "$artifact" ]]; then
        result="nothing found"
    else
        found=1
        # A Rust panic (location and message), else the sanitizer's or
        # libFuzzer's one-line summary (crash, out-of-memory, timeout, leak).
        what=$(grep -m1 -A1 'panicked at' "$log" | tr '\n' ' ')
        [[ -n "$what" ]] || what=$(grep -m1 '^SUMMARY: ' "$log")
        [[ -n "$what" ]] || what=$(grep -m1 'ERROR: ' "$log")
        what=${what:0:160}
        result="FOUND (exit $rc): ${what:-see log}; input: fuzz/${artifact:-?}"
    fi
    summary+=("$(printf '%-22s %12s runs %6ss %9s/s  %s' "$t" "$runs" "$took" "$rate" "$result")")
done

echo
echo "caps: rss ${RSS_LIMIT_MB} MB, malloc ${MALLOC_LIMIT_MB} MB, ${TIMEOUT_S} s per input"
printf '%s\n' "${summary[@]}"
exit "$found"
