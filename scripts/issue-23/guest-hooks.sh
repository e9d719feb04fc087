#!/bin/bash
# Issue 23 groundwork: which file/block hooks exist and attach on the Debian guest kernels, and
# how a bio links to the file call that caused it. Reproduces docs/notes-issue-23.md.
#
#   scripts/issue-23/guest-hooks.sh KERNELS_DIR [OUT_DIR]
# KERNELS_DIR: a `target/vm/kernels` of `cargo xtask vm-test` (series dirs 6.1, 6.12,
# 6.1-generic, 6.12-generic and debs/ with the .deb files). Needs qemu-system-x86_64,
# busybox(-static), cpio, gcc, bpftool, lz4/xz/zstd, mkfs.ext4, objcopy. Takes ~3 min under emulation.
# Per kernel it (1) extracts vmlinux and dumps its BTF, (2) boots a guest that loads xfs (+ ext4
# on generic kernels), then load+attaches an empty fentry/fexit/tp_btf program per hook
# (hookprobe.c), tries a tracefs kprobe per function and lists tracepoints; (3) on the cloud
# kernels, boots a guest with an ext4 NVMe disk, traces one O_DIRECT and one buffered 1 MiB
# pread of a file and of /dev/nvme0n1 with tracefs kprobes that dereference bio->bi_private,
# rq->bio and page->mapping->host (rd.c). Output: OUT_DIR/{hooks,link}-<series>.txt.
set -uo pipefail
K=$(realpath "$1"); OUT=$(realpath -m "${2:-/tmp/issue-23}"); HERE=$(dirname "$(realpath "$0")")
mkdir -p "$OUT/w"; cd "$OUT/w"
gcc -O1 -static -o hookprobe "$HERE/hookprobe.c"; gcc -O1 -static -o rd "$HERE/rd.c"

extract() { # vmlinuz -> vmlinux (lz4 / xz / zstd payload)
  python3 - "$1" "$2" <<'PY'
import sys, subprocess
d = open(sys.argv[1], 'rb').read()
for magic, cmd in [(b'\x02\x21\x4c\x18', ['lz4', '-dc']), (b'\xfd7zXZ\x00', ['xz', '-dc']),
                   (b'\x28\xb5\x2f\xfd', ['zstd', '-dc'])]:
    i = d.find(magic)
    while i >= 0:
        p = subprocess.run(cmd, input=d[i:], capture_output=True)
        if p.stdout[:4] == b'\x7fELF':
            open(sys.argv[2], 'wb').write(p.stdout); sys.exit(0)
        i = d.find(magic, i + 1)
sys.exit('no vmlinux in ' + sys.argv[1])
PY
}
modinfo_field() { objcopy -O binary --only-section=.modinfo "$1" /dev/stdout | tr '\0' '\n' | grep "^$2=" | cut -d= -f2- || true; }
declare -A SEEN
mods() { # root module -> .ko paths in load order (depends + softdep pre)
  local m=${2//-/_}; [ -n "${SEEN[$m]:-}" ] && return; SEEN[$m]=1
  [ "$m" = crc32c ] && m=crc32c_generic
  local ko; ko=$(find "$1" -name "$m.ko" | head -1); [ -z "$ko" ] && return
  for d in $(modinfo_field "$ko" depends | tr ',' ' ') $(modinfo_field "$ko" softdep | sed 's/pre://;s/post:.*//'); do mods "$1" "$d"; done
  echo "$ko"; }
btfid() { grep -E "^\[[0-9]+\] $1 '$2' " "$3" | head -1 | sed -E 's/^\[([0-9]+)\].*/\1/'; }

FN="vfs_read vfs_write vfs_iter_read vfs_iter_write ksys_pread64 ksys_read blkdev_read_iter blkdev_write_iter filemap_read generic_file_read_iter iomap_dio_rw __iomap_dio_rw iomap_dio_complete iomap_dio_bio_end_io submit_bio blk_mq_start_request blk_account_io_start vfs_fsync_range ext4_file_read_iter ext4_file_write_iter io_read aio_read"
MODFN="ext4_file_read_iter ext4_file_write_iter xfs_file_read_iter xfs_file_write_iter"
TP="iomap_dio_rw_begin iomap_dio_complete iomap_iter mm_filemap_get_pages mm_filemap_add_to_page_cache page_cache_sync_ra page_cache_async_ra block_bio_queue block_getrq block_split block_io_start block_io_done block_rq_insert block_rq_issue block_rq_complete writeback_dirty_folio writeback_single_inode_start ext4_sync_file_enter sys_enter sys_exit io_uring_submit_req io_uring_submit_sqe io_uring_complete"
MODTP="xfs_file_buffered_read xfs_file_direct_read ext4_sync_file_enter"

for s in 6.1 6.12 6.1-generic 6.12-generic; do
  pkg=$(cat "$K/$s/PACKAGE"); deb=$(ls "$K"/debs/"${pkg}"_*.deb | head -1)
  extract "$K/$s/vmlinuz" "vmlinux-$s"; bpftool btf dump file "vmlinux-$s" > "btf-$s.txt"
  rm -rf "x-$s"; mkdir -p "x-$s"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "x-$s" --wildcards '*/kernel/fs/*' '*/kernel/lib/*' '*/kernel/crypto/*' 2>/dev/null || true
  find "x-$s" -name '*.ko.xz' -exec xz -df {} \;
  r="root-$s"; rm -rf "$r"; mkdir -p "$r"/{bin,mods,proc,sys,dev,mnt}
  cp "$(command -v busybox)" "$r/bin/"; for a in sh mount insmod grep cat echo poweroff sleep sync ls sed; do ln -sf busybox "$r/bin/$a"; done
  cp hookprobe rd "$r/"
  SEEN=(); i=10; for ko in $(mods "x-$s" xfs; mods "x-$s" ext4); do cp "$ko" "$r/mods/$i-$(basename "$ko")"; i=$((i+1)); done
  args=""
  for f in $FN; do id=$(btfid FUNC "$f" "btf-$s.txt"); if [ -n "$id" ]; then args+=" fentry:$f:$id fexit:$f:$id"; fi; done
  for t in $TP; do id=$(btfid TYPEDEF "btf_trace_$t" "btf-$s.txt"); if [ -n "$id" ]; then args+=" tp:$t:$id"; fi; done
  for ko in "$r"/mods/*-xfs.ko "$r"/mods/*-ext4.ko; do
    [ -f "$ko" ] || continue; m=$(basename "$ko" .ko); m=${m#*-}; bpftool -B "vmlinux-$s" btf dump file "$ko" > "btf-$s-$m.txt"
    for f in $MODFN; do id=$(btfid FUNC "$f" "btf-$s-$m.txt"); if [ -n "$id" ]; then args+=" fentry:$f:$id:$m fexit:$f:$id:$m"; fi; done
    for t in $MODTP; do id=$(btfid TYPEDEF "btf_trace_$t" "btf-$s-$m.txt"); if [ -n "$id" ]; then args+=" tp:$t:$id:$m"; fi; done
  done
  echo "$args" > "$r/args"
  cat > "$r/init" <<INIT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tracefs t /sys/kernel/tracing
T=/sys/kernel/tracing
for m in /mods/*.ko; do insmod \$m 2>/dev/null && echo "@@MOD \$m ok" || echo "@@MOD \$m fail"; done
echo "@@UNAME \$(cat /proc/version)"
/hookprobe \$(cat /args)
for f in $FN xfs_file_read_iter xfs_file_write_iter; do
  grep -q "^\$f\\( \\|\$\\)" \$T/available_filter_functions && ff=yes || ff=no
  echo "p:kp_\$f \$f" >> \$T/kprobe_events 2>/dev/null && kp=ok || kp=fail
  echo "@@FN \$f ftrace=\$ff kprobe=\$kp"
done
echo > \$T/kprobe_events
for t in $TP $MODTP; do grep -q ":\$t\$" \$T/available_events && echo "@@TP \$t yes" || echo "@@TP \$t no"; done
poweroff -f
INIT
  chmod +x "$r/init"; (cd "$r" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "../initrd-$s.gz")
  timeout 300 qemu-system-x86_64 -m 1024 -smp 1 -nographic -no-reboot -kernel "$K/$s/vmlinuz" \
    -initrd "initrd-$s.gz" -append "console=ttyS0 quiet panic=-1" 2>&1 | tr -d '\r' | grep -a '@@' > "$OUT/hooks-$s.txt" || true
  echo "== $s: $(grep -c 'attach=ok' "$OUT/hooks-$s.txt") of $(grep -c '@@HOOK' "$OUT/hooks-$s.txt") BPF attaches ok -> $OUT/hooks-$s.txt"
done

# Linking on the cloud kernels (ext4 and NVMe built in).
mkdir -p fsdir; head -c 4194304 /dev/urandom > fsdir/f
for s in 6.1 6.12; do
  case $s in 6.1) FI=32;; 6.12) FI=40;; esac   # struct file.f_inode (BTF)
  r="link-$s"; rm -rf "$r"; cp -a "root-$s" "$r"; rm -rf "$r/mods"
  cat > "$r/init" <<INIT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tracefs t /sys/kernel/tracing
T=/sys/kernel/tracing
sleep 1; mount -t ext4 /dev/nvme0n1 /mnt || echo "@@ERR mount"
echo 'p:k_ext4r ext4_file_read_iter iocb=%di:x64 pos=+8(%di):s64 kflags=+32(%di):x32 ino=+64(+$FI(+0(%di))):u64' >> \$T/kprobe_events
echo 'p:k_bdev blkdev_read_iter iocb=%di:x64 pos=+8(%di):s64 kflags=+32(%di):x32' >> \$T/kprobe_events
echo 'p:k_dio __iomap_dio_rw iocb=%di:x64' >> \$T/kprobe_events
echo 'r:k_dior __iomap_dio_rw dio=\$retval:x64' >> \$T/kprobe_events
echo 'p:k_sub submit_bio bio=%di:x64 priv=+64(%di):x64 endio=+56(%di):x64 sector=+32(%di):u64 size=+40(%di):u32 diocb=+0(+64(%di)):x64 pg=+0(+112(%di)):x64 ino=+64(+0(+24(+0(+112(%di))))):u64 idx=+32(+0(+112(%di))):u64' >> \$T/kprobe_events
echo 'p:k_rq blk_mq_start_request rq=%di:x64 rqbio=+56(%di):x64 len=+44(%di):u32 sector=+48(%di):u64 priv=+64(+56(%di)):x64 endio=+56(+56(%di)):x64 ppriv=+64(+64(+56(%di))):x64' >> \$T/kprobe_events
echo 'p:k_end iomap_dio_bio_end_io bio=%di:x64 priv=+64(%di):x64 iocb=+0(+64(%di)):x64' >> \$T/kprobe_events
echo 1 > \$T/events/kprobes/enable; echo 1 > \$T/events/block/block_rq_issue/enable
/rd /mnt/f; echo "@@MARK raw device"; /rd /dev/nvme0n1; sync
echo 0 > \$T/events/kprobes/enable; echo 0 > \$T/events/block/block_rq_issue/enable
grep -v '^#' \$T/trace | grep -E 'rd-|k_end' | sed 's/^/@@T /'
grep -E ' (iomap_dio_bio_end_io|mpage_end_io|mpage_read_end_io|ext4_end_bio|end_bio_bh_io_sync|bio_chain_endio|blkdev_bio_end_io|blkdev_bio_end_io_async|submit_bio_wait_endio)\$' /proc/kallsyms | sed 's/^/@@SYM /'
ls -i /mnt/f | sed 's/^/@@INO /'
poweroff -f
INIT
  chmod +x "$r/init"; (cd "$r" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "../linkrd-$s.gz")
  rm -f "disk-$s.img"; truncate -s 64M "disk-$s.img"; mkfs.ext4 -q -F -d fsdir "disk-$s.img"
  timeout 300 qemu-system-x86_64 -m 1024 -smp 1 -nographic -no-reboot -kernel "$K/$s/vmlinuz" \
    -initrd "linkrd-$s.gz" -append "console=ttyS0 quiet panic=-1" \
    -drive "file=disk-$s.img,if=none,id=nvm,format=raw" -device nvme,serial=deadbeef,drive=nvm \
    2>&1 | tr -d '\r' | grep -a '@@' > "$OUT/link-$s.txt" || true
  echo "== $s link trace -> $OUT/link-$s.txt"
done
