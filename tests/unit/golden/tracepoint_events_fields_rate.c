/* tracekeeper program: tracepoint sched:sched_process_exec events fields filename,pid */
#define TK_MAX_BINDINGS 64
#define TK_MAX_IDENTITIES 16384
#define TK_MAX_SLOTS 16385
#define TK_MAX_PIDS 8192
#define TK_MAX_CHILD_PIDS 65536
#define TK_MAX_COMMS 4096
#define TK_MAX_KEYS 10240
#define TK_MAX_LEVEL 16
#define TK_VERDICT_ENTRIES 16384
#define TK_RING_PAGES 512
#define TK_NCOUNTERS 5
#define TK_MAX_PENDING 2048
#define TK_MAX_CGROUP_PATH 256
#define TK_CGROUP2_HIERARCHY 0
#define TK_FNV_OFFSET 0xcbf29ce484222325ULL
#define TK_FNV_PRIME 0x100000001b3ULL
#define TK_NCLAIM_COUNTERS 4
#define TK_COMM_LEN 16
#define TK_MATCHED 0
#define TK_SAMPLED_OUT 1
#define TK_RATE_LIMITED 2
#define TK_RING_FULL 3
#define TK_NEW_KEYS 4
#define TK_FLAG_CGROUP 1
#define TK_FLAG_PID 2
#define TK_FLAG_COMM 4
#define TK_FLAG_FOLLOW 8
#define TK_CLAIM_MKDIRS 0
#define TK_CLAIM_CLAIMED 1
#define TK_CLAIM_IDENTITY_FULL 2
#define TK_CLAIM_REMOVED 3
#define TK_OUTPUT_COUNT 0
#define TK_OUTPUT_HISTOGRAM 0
#define TK_OUTPUT_EVENTS 1
#define TK_BY_CGROUP 0
#define TK_BY_PID 0
#define TK_BY_COMM 0
#define TK_FOLLOW_CHILDREN 0
/* ... c_prelude.h ... */

struct tk_event {
    u64 bindings;
    u64 ts;
    u64 cgroup;
    u32 pid;
    u32 tid;
    char comm[TK_COMM_LEN];
    char f_filename[256];
    s64 f_pid;
};

TRACEPOINT_PROBE(sched, sched_process_exec) {
    TK_ADMIT();
    tk_mask = tk_rate_ok(tk_mask);
    if (!tk_mask)
        return 0;
    struct tk_event *e = tk_events.ringbuf_reserve(sizeof(struct tk_event));
    if (!e) {
        tk_ring_full(tk_mask);
        return 0;
    }
    TK_EVENT_COMMON(e);
    TP_DATA_LOC_READ_STR(e->f_filename, filename, sizeof(e->f_filename));
    e->f_pid = args->pid;
    tk_events.ringbuf_submit(e, 0);
    return 0;
}
