#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
// rd FILE: one O_DIRECT 1 MiB pread at 0, then one buffered 1 MiB pread at 1 MiB; prints tid and results.
int main(int c,char**v){ void*b; posix_memalign(&b,4096,1<<20);
 int fd=open(v[1],O_RDONLY|O_DIRECT); printf("@@RD tid=%ld direct ret=%zd\n",(long)syscall(SYS_gettid),pread(fd,b,1<<20,0)); close(fd);
 fd=open(v[1],O_RDONLY); printf("@@RD buffered ret=%zd\n",pread(fd,b,1<<20,1<<20)); struct stat; close(fd); return 0; }
