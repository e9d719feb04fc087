// hookprobe: load + attach a 2-insn BPF program per hook. Args: KIND:NAME:BTFID[:MODULE]
// --hold: keep the links attached until killed (cost measurements).
// KIND = fentry | fexit | tp (tp_btf raw tracepoint; BTFID = btf_trace_<NAME> typedef)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <stdint.h>
#include <sys/syscall.h>
static long bpf(int cmd, void *attr, unsigned size){ return syscall(__NR_bpf, cmd, attr, size); }
static int module_btf_fd(const char *mod){
  uint32_t id = 0;
  for(;;){
    unsigned char a[128]; memset(a,0,sizeof a); memcpy(a,&id,4);
    if(bpf(23,a,sizeof a)<0) return -1;               // BPF_BTF_GET_NEXT_ID
    memcpy(&id,a+4,4);
    unsigned char b[128]; memset(b,0,sizeof b); memcpy(b,&id,4);  // btf_id @0
    int fd = bpf(19,b,sizeof b); if(fd<0) continue;    // BPF_BTF_GET_FD_BY_ID
    char name[64]={0}; unsigned char info[64]; memset(info,0,sizeof info);
    uint64_t np=(uint64_t)(uintptr_t)name; uint32_t nl=sizeof name; memcpy(info+16,&np,8); memcpy(info+24,&nl,4);
    unsigned char g[128]; memset(g,0,sizeof g); uint32_t ilen=sizeof info; uint64_t ip=(uint64_t)(uintptr_t)info;
    memcpy(g,&fd,4); memcpy(g+4,&ilen,4); memcpy(g+8,&ip,8);
    if(bpf(15,g,sizeof g)==0 && strcmp(name,mod)==0) return fd;  // BPF_OBJ_GET_INFO_BY_FD
    close(fd);
  }
}
int main(int argc,char**argv){
  int hold = argc>1 && !strcmp(argv[1],"--hold"); if(hold){argv++;argc--;}
  uint64_t insns[2] = { 0x00000000000000b7ULL /* r0 = 0 */, 0x0000000000000095ULL /* exit */ };
  const char *lic="GPL";
  for(int i=1;i<argc;i++){
    char buf[256]; strncpy(buf,argv[i],255); buf[255]=0;
    char *kind=strtok(buf,":"), *name=strtok(NULL,":"), *ids=strtok(NULL,":"), *mod=strtok(NULL,":");
    uint32_t at = !strcmp(kind,"fentry")?24: !strcmp(kind,"fexit")?25: 23;
    uint32_t btfid=atoi(ids), pt=26, cnt=2; int objfd=0;
    if(mod){ objfd=module_btf_fd(mod); if(objfd<0){ printf("@@HOOK %s %s%s%s load=no-module-btf attach=-\n",kind,mod,":",name); continue; } }
    unsigned char a[160]; memset(a,0,sizeof a);
    uint64_t ip=(uint64_t)(uintptr_t)insns, lp=(uint64_t)(uintptr_t)lic;
    memcpy(a,&pt,4); memcpy(a+4,&cnt,4); memcpy(a+8,&ip,8); memcpy(a+16,&lp,8);
    memcpy(a+68,&at,4); memcpy(a+108,&btfid,4); if(mod) memcpy(a+112,&objfd,4);
    int pfd=bpf(5,a,sizeof a);
    if(pfd<0){ printf("@@HOOK %s %s%s%s load=ERR(%s) attach=-\n",kind,mod?mod:"",mod?":":"",name,strerror(errno)); continue; }
    unsigned char r[16]; memset(r,0,sizeof r); memcpy(r+8,&pfd,4);
    int lfd=bpf(17,r,sizeof r);                        // BPF_RAW_TRACEPOINT_OPEN (name NULL: attach_btf_id)
    printf("@@HOOK %s %s%s%s load=ok attach=%s\n",kind,mod?mod:"",mod?":":"",name, lfd<0?strerror(errno):"ok");
    if(hold) continue; if(lfd>=0) close(lfd); close(pfd); if(objfd>0) close(objfd);
  }
  if(hold){ fflush(stdout); pause(); }
  return 0;
}
