#!/bin/bash
# GPU host (the device tool's machine): issue 23's file-layer checks and the tracing
# benchmarks before/after, as reported in the closing notes.
# Build here: `cargo build --release -p gds-user --bin gds-agent` and
# `cargo bench --no-run -p gds-user --bench trace_overhead --bench cufile_overhead --bench file_overhead`;
# copy gds-agent to .device/gds-agent, the bench binaries to .device/after/ (and an older
# build's to .device/before/), carry .device, run from the repository root.
set -u
B=${GDS_AGENT:-$PWD/.device/gds-agent}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/gds-file-out}; mkdir -p $OUT
PY=python3; for p in /opt/torch/.venv/bin/python3 python3; do if $p -c "import torch, numpy" 2>/dev/null; then PY=$p; break; fi; done
LIB=/usr/local/cuda/targets/x86_64-linux/lib/libcufile.so.0
uname -r; nvidia-smi --query-gpu=name --format=csv,noheader
F=/var/tmp/gds-1g.bin
MM=$(python3 -c "import os;d=os.stat('/var/tmp').st_dev;print(f'{os.major(d)}:{os.minor(d)}')"); mkdir -p /run/udev/data
printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=ext4\n' > /run/udev/data/b$MM
[ -f $F ] || head -c 1073741824 /dev/urandom > $F
findmnt -T /var/tmp -o SOURCE,FSTYPE | tail -1
get() { python3 -c "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9477'+sys.argv[1]).read().decode())" "$1"; }
start_agent() { $B run --listen 127.0.0.1:9477 "$@" > $OUT/agent-$N.log 2>&1 & AG=$!; for i in $(seq 100); do get /metrics >/dev/null 2>&1 && break; sleep 0.1; done; sleep 0.5; }
N=default; start_agent
get /debug/layers > $OUT/layers-default.json
grep -i "file" $OUT/agent-default.log | head -5
$PY $HERE/file_layer_gpu.py load $F http://127.0.0.1:9477 | tee $OUT/load-default.json
$PY $HERE/file_layer_gpu.py fromfile $F http://127.0.0.1:9477 | tee $OUT/fromfile-default.json
get /metrics | grep -E "^gds_file_(requests|bytes)_total|origin=" | grep -v " 0$" | head -30
kill $AG; wait $AG
N=syscalls; start_agent --file-hooks syscalls
$PY $HERE/file_layer_gpu.py load $F http://127.0.0.1:9477 | tee $OUT/load-syscalls.json
$PY $HERE/file_layer_gpu.py fromfile $F http://127.0.0.1:9477 | tee $OUT/fromfile-syscalls.json
kill $AG; wait $AG
# Benchmarks: before (issue 24's base) and after, interleaved, each binary self-contained.
for round in 1 2; do
for v in before after; do
  [ -x .device/$v/trace_overhead ] || continue
  echo "== $v round $round trace_overhead"; .device/$v/trace_overhead --bench 2>&1 | tail -16
  [ -n "${CUFILE_BENCH:-}" ] && { echo "== $v round $round cufile_overhead"; GDS_LIBCUFILE=$LIB .device/$v/cufile_overhead --bench 2>&1 | tail -8; }
done
done 2>&1 | tee $OUT/bench.txt
[ -n "${FILE_BENCH:-}" ] && [ -x .device/after/file_overhead ] && { echo "== file_overhead"; .device/after/file_overhead --bench 2>&1 | tail -16; } | tee -a $OUT/bench.txt
cd $OUT && tar czf results.tgz *.txt *.json *.log && rm -f *.txt *.json *.log
