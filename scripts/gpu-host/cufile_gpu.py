"""GPU host: torch.cuda.gds GdsFile load/save of a file into/from GPU memory, timed.
usage: cufile_gpu.py warm|load|save|loop FILE [REPS]"""
import os, sys, time
import torch
from torch.cuda.gds import GdsFile

cmd, path = sys.argv[1], sys.argv[2]
reps = int(float(sys.argv[3])) if len(sys.argv) > 3 else 1
size = os.path.getsize(path) if cmd != "save" else (1 << 30)
st = torch.empty(size, dtype=torch.uint8, device="cuda").untyped_storage()
torch.cuda.synchronize()
if cmd == "warm":
    # Loads libcufile (dlopen) and registers once, then waits for the agent to attach.
    f = GdsFile(path, os.O_RDONLY)
    del f
    print("warm pid", os.getpid(), flush=True)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 2.5)
    f = GdsFile(path, os.O_RDONLY)
    t = time.time(); f.load_storage(st, 0); torch.cuda.synchronize(); dt = time.time() - t
    print(f"load {size} B in {dt:.3f}s = {size/dt/1e9:.2f} GB/s", flush=True)
    out = path + ".saved"
    g = GdsFile(out, os.O_CREAT | os.O_RDWR)
    t = time.time(); g.save_storage(st, 0); torch.cuda.synchronize(); dt = time.time() - t
    print(f"save {size} B in {dt:.3f}s = {size/dt/1e9:.2f} GB/s", flush=True)
    print("saved size", os.path.getsize(out), flush=True)
    time.sleep(1.0)
elif cmd == "loop":
    f = GdsFile(path, os.O_RDONLY)
    f.load_storage(st, 0); torch.cuda.synchronize()
    rates = []
    for _ in range(reps):
        t = time.time(); f.load_storage(st, 0); torch.cuda.synchronize(); dt = time.time() - t
        rates.append(size / dt / 1e9)
    print("rates", " ".join(f"{r:.3f}" for r in rates), flush=True)
