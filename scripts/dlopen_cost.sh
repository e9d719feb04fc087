#!/bin/bash
# What the cuFile layer's dlopen notification (a uprobe on every dynamic loader's
# _dl_debug_state) costs processes that never map libcufile: 1000 x /bin/true and a
# dlopen/dlclose loop of a small library, without and with the agent, alternating rounds;
# prints the medians and their ratio. Run as root from the repository root:
#   scripts/dlopen_cost.sh target/release/gds-agent [rounds]
set -eu
AGENT=${1:?agent binary}; ROUNDS=${2:-5}; PORT=${GDS_COST_PORT:-19599}
W=$(mktemp -d); trap 'kill $AG 2>/dev/null; rm -rf $W' EXIT; AG=
cat > $W/dlloop.c <<'C'
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        void *h = dlopen(argv[2], RTLD_NOW);
        if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
        dlclose(h);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
C
cc -O2 -o $W/dlloop $W/dlloop.c -ldl
echo 'int gds_cost(void) { return 1; }' | cc -shared -fPIC -x c - -o $W/libgdscost.so
true1000() { local s e; s=$(date +%s%N); for _ in $(seq 1000); do /bin/true; done; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for r in $(seq $ROUNDS); do
  for mode in none agent; do
    if [ $mode = agent ]; then
      $AGENT run --listen 127.0.0.1:$PORT > $W/agent.log 2>&1 & AG=$!
      for _ in $(seq 100); do grep -q 'serving' $W/agent.log && break; sleep 0.1; done; sleep 1
    fi
    echo "$mode $(true1000) $($W/dlloop 10000 $W/libgdscost.so)" >> $W/results
    if [ -n "$AG" ]; then kill $AG; wait $AG 2>/dev/null || true; AG=; fi
  done
done
for mode in none agent; do
  t=$(grep "^$mode " $W/results | awk '{print $2}' | median)
  d=$(grep "^$mode " $W/results | awk '{print $3}' | median)
  echo "$mode: 1000 x /bin/true ${t} ms; dlopen+dlclose ${d} ns"
  eval "${mode}_t=$t ${mode}_d=$d"
done
awk -v a=$agent_t -v b=$none_t -v c=$agent_d -v d=$none_d 'BEGIN {printf "ratio agent/none: /bin/true %.2f, dlopen+dlclose %.2f (medians of '$ROUNDS' rounds)\n", a/b, c/d}'
