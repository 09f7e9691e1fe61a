#!/usr/bin/env bash
# Runs corepin's coverage-guided fuzz targets (fuzz/, cargo-fuzz + libFuzzer) for SECONDS each
# (default 900), two at a time, on the nightly toolchain (sanitizer coverage needs it; the
# targets themselves are plain Rust). A crash stops its target and leaves the input in
# fuzz/artifacts/<target>/; turn it into a regression test next to the code it broke.
#   scripts/fuzz.sh            # every target, 15 minutes each
#   scripts/fuzz.sh 60 range   # one target, one minute
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-900}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^corepin-fuzz$')
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/logs
run_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t"
  echo "fuzzing $t for ${secs}s (log: fuzz/logs/$t.log)"
  (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=1024) >"fuzz/logs/$t.log" 2>&1
  local rc=$?
  grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done)' "fuzz/logs/$t.log" | sed "s/^/  $t: /" || true
  return $rc
}
status=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" & pids+=($!)
  if ((${#pids[@]} == 2)); then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
if ((status)); then echo "a fuzz target failed: see fuzz/logs and fuzz/artifacts" >&2; fi
exit $status
