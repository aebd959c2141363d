#!/bin/sh
# Bounded fuzzing of both targets: run.sh BUILD_DIR SECONDS
# fuzz_image gets 3/4 of the time, fuzz_meta the rest. Prints each target's
# executions and fails on any crash, leak, timeout or out-of-memory.
set -u
build=$1
total=$2
image_s=$((total * 3 / 4))
[ "$image_s" -ge 1 ] || image_s=1
meta_s=$((total - image_s))
[ "$meta_s" -ge 1 ] || meta_s=1

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:handle_abort=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$build/artifacts" "$build/logs"

status=0
fuzz() {
    name=$1
    secs=$2
    log="$build/logs/$name.log"
    mkdir -p "$build/corpus/$name"
    echo "fuzz_$name: ${secs} s (log: $log)"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of options
    "$build/fuzz_$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 \
        -detect_leaks=1 -print_final_stats=1 -artifact_prefix="$build/artifacts/$name-" \
        ${FUZZ_ARGS:-} "$build/corpus/$name" "$build/seeds/$name" \
        $( [ "$name" = image ] && echo "$(dirname "$0")/seeds" ) >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 |
          sed -n 's/.*\(cov: [0-9]*\).*\(corp: [^ ]*\).*/\1 \2/p')
    echo "fuzz_$name: ${execs:-?} executions, ${rate:-?} exec/s, ${cov:-no coverage line}, exit $rc"
    if [ "$rc" -ne 0 ]; then
        echo "fuzz_$name FAILED; end of $log:"
        tail -n 60 "$log"
        status=1
    fi
}
fuzz image "$image_s"
fuzz meta "$meta_s"
found=$(ls "$build/artifacts" 2>/dev/null)
if [ -n "$found" ]; then
    echo "inputs kept in $build/artifacts: $found"
    [ "$status" -ne 0 ] || echo "(left from earlier runs; this run found nothing)"
fi
exit $status
