"""How long after a cold dlopen of libcufile the agent counts its calls.

Loads a libcufile copy (a new inode each run, as a job that unpacks its environment), then calls
cuFileRead (a null handle: returns at once, no GPU needed) every 0.5 ms for 500 ms; the calls the
running agent did not count were made before it attached. Run as root beside an agent listening
on --agent (default 127.0.0.1:9477):

    python3 scripts/cufile_dlopen_latency.py target/pypi/nvidia-cufile/nvidia/cu13/lib/libcufile.so.0
"""
import argparse
import ctypes
import os
import shutil
import tempfile
import time
import urllib.request


def read_calls(agent):
    text = urllib.request.urlopen(f"http://{agent}/metrics").read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("gds_cufile_calls_total{") and 'op="read"' in line
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("libcufile")
    p.add_argument("--agent", default="127.0.0.1:9477")
    args = p.parse_args()
    d = tempfile.mkdtemp()
    lib_path = os.path.join(d, "libcufile.so.0")
    shutil.copy(args.libcufile, lib_path)
    before = read_calls(args.agent)
    t0 = time.perf_counter()
    f = ctypes.CDLL(lib_path).cuFileRead
    f.restype = ctypes.c_int64
    made = 0
    while time.perf_counter() - t0 < 0.5:
        f(None, None, ctypes.c_size_t(4096), ctypes.c_int64(0), ctypes.c_int64(0))
        made += 1
        time.sleep(0.0005)
    time.sleep(1.0)
    counted = read_calls(args.agent) - before
    print(f"{made} calls in 500 ms, {counted:.0f} counted: the first ~{(made - counted) / made * 500:.0f} ms were before the attach")
    shutil.rmtree(d)


if __name__ == "__main__":
    main()
