"""GPU host: issue 23's checks. What the agent's file layer attributed to this process.
usage: file_layer_gpu.py load|fromfile FILE AGENT_URL
  load      torch.cuda.gds GdsFile(FILE, O_RDONLY|O_DIRECT).load_storage of the whole file
  fromfile  numpy.fromfile of the whole file (buffered reads)
Prints this pid's file rows and block rows from /debug/snapshot, after the reads."""
import json, os, sys, time, urllib.request

cmd, path, agent = sys.argv[1], sys.argv[2], sys.argv[3]
size = os.path.getsize(path)
ino = os.stat(path).st_ino
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
t = time.time()
if cmd == "load":
    import torch
    from torch.cuda.gds import GdsFile
    st = torch.empty(size, dtype=torch.uint8, device="cuda").untyped_storage()
    torch.cuda.synchronize()
    t = time.time()
    f = GdsFile(path, os.O_RDONLY | os.O_DIRECT)
    f.load_storage(st, 0)
    torch.cuda.synchronize()
else:
    import numpy
    a = numpy.fromfile(path, dtype=numpy.uint8)
    assert a.size == size
dt = time.time() - t
time.sleep(1.5)
snap = json.loads(urllib.request.urlopen(agent + "/debug/snapshot").read())
me = os.getpid()
rows = [r for r in snap["stats"]["file"]["processes"] if r["pid"] == me]
block = [r for r in snap["stats"].get("block_processes", []) if r["pid"] == me]
calls = sum(r["calls"] for r in rows if r["ino"] == ino and r["op"] == "read")
nbytes = sum(r["bytes"] for r in rows if r["ino"] == ino and r["op"] == "read")
bbytes = sum(r["bytes"] for r in block if r["op"] == "read")
print(json.dumps({"cmd": cmd, "pid": me, "size": size, "seconds": round(dt, 3),
                  "file_calls": calls, "file_bytes": nbytes, "exact": nbytes == size,
                  "block_read_bytes": bbytes, "file_rows": rows, "block_rows": block}))
