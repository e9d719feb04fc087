#!/bin/bash
# GPU host (the device tool's machine): the cuFile layer end to end, as reported in issue 15's
# note. Untraced/traced GdsFile.load_storage loops, a GdsFile load and save of 1 GiB, the
# project's `read --path compat`, `probe --canary`; metrics and /debug/cufile saved into $OUT.
# Build here (`cargo build --release -p gds-user --bin gds-agent`), copy the binary to
# .device/gds-agent (or set GDS_AGENT), carry .device, run from the repository root.
set -u
get() { python3 -c "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9477'+sys.argv[1]).read().decode())" "$1"; }
B=${GDS_AGENT:-$PWD/.device/gds-agent}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/gds-cufile-out}; mkdir -p $OUT
PY=python3; for p in /opt/torch/.venv/bin/python3 python3; do if $p -c "import torch" 2>/dev/null; then PY=$p; break; fi; done
echo "python: $PY"; $PY -c "import torch; print('torch', torch.__version__)"
uname -r; nvidia-smi --query-gpu=name --format=csv,noheader
F=/var/tmp/gds-1g.bin
MM=$(python3 -c "import os;d=os.stat('/var/tmp').st_dev;print(f'{os.major(d)}:{os.minor(d)}')"); mkdir -p /run/udev/data
printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=ext4\n' > /run/udev/data/b$MM
[ -f $F ] || head -c 1073741824 /dev/urandom > $F
cd /tmp
# Untraced baseline, then traced, then untraced, then traced (page cache warm).
run_loop() { $PY $HERE/cufile_gpu.py loop $F 6 2>&1 | grep rates; }
start_agent() { $B run --listen 127.0.0.1:9477 > $OUT/agent-$1.log 2>&1 & AG=$!; for i in $(seq 50); do get /metrics >/dev/null 2>&1 && break; sleep 0.1; done; }
for round in 1 2 3; do
echo "untraced$round $(run_loop)" | tee -a $OUT/throughput.txt
start_agent loop$round; sleep 0.3
echo "traced$round $(run_loop)" | tee -a $OUT/throughput.txt
get /debug/cufile > $OUT/debug-loop$round.json; kill $AG; wait $AG
done
start_agent main; sleep 0.3
get /metrics > $OUT/metrics-0.txt
$PY $HERE/cufile_gpu.py warm $F 2.5 > $OUT/warm.txt 2>&1 &
WP=$!; sleep 4; get /debug/cufile > $OUT/debug-during.json; wait $WP; cat $OUT/warm.txt | tail -5
get /metrics > $OUT/metrics-1.txt
get /debug/cufile > $OUT/debug-1.json
# The project's own compat read.
LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib timeout 120 $B read $F --to gpu --path compat > $OUT/read-compat.txt 2>&1; echo "read rc=$?" >> $OUT/read-compat.txt
sleep 1
get /metrics > $OUT/metrics-2.txt
get /debug/cufile > $OUT/debug-2.json
# The canary (its own tracer), with the agent still running.
LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib timeout 120 $B probe --canary $F > $OUT/canary.txt 2>&1; echo "canary rc=$?" >> $OUT/canary.txt
LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib timeout 120 $B probe --canary $F --json > $OUT/canary-json.txt 2>&1
get /debug/cufile > $OUT/debug-3.json
kill $AG; wait $AG
cat $OUT/throughput.txt $OUT/warm.txt $OUT/read-compat.txt $OUT/canary.txt
grep cufile $OUT/metrics-2.txt | grep -v " 0$" | grep -v _bucket | head -60
cd $OUT && tar czf results.tgz *.txt *.json *.log && rm -f *.txt *.json *.log
