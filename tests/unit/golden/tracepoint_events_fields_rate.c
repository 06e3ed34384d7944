/* tracekeeper probe team-a/probe (tracepoint, events) */
#define TK_FILTER_CGROUP 1
#define TK_FILTER_PID 0
#define TK_FILTER_COMM 1
#define TK_FOLLOW_CHILDREN 0
#define TK_HOST_WIDE 0
#define TK_SAMPLING 1
#define TK_OUTPUT_COUNT 0
#define TK_OUTPUT_HISTOGRAM 0
#define TK_OUTPUT_EVENTS 1
#define TK_BY_CGROUP 0
#define TK_BY_PID 0
#define TK_BY_COMM 0
#define TK_RATE_LIMIT 50
#define TK_MAX_CGROUPS 16384
#define TK_MAX_PIDS 65536
#define TK_MAX_KEYS 10240
#define TK_MAX_LEVEL 16
#define TK_RING_PAGES 512
/* ... c_prelude.h ... */

struct tk_event {
    u64 ts;
    u64 cgroup;
    u32 pid;
    u32 tid;
    char comm[TASK_COMM_LEN];
    char f_filename[256];
    s64 f_pid;
};

TRACEPOINT_PROBE(sched, sched_process_exec) {
    if (!tk_admit())
        return 0;
    if (!tk_rate_ok())
        return 0;
    struct tk_event *e = tk_events.ringbuf_reserve(sizeof(struct tk_event));
    if (!e) {
        tk_inc(TK_RING_FULL);
        return 0;
    }
    TK_EVENT_COMMON(e);
    TP_DATA_LOC_READ_STR(e->f_filename, filename, sizeof(e->f_filename));
    e->f_pid = args->pid;
    tk_events.ringbuf_submit(e, 0);
    return 0;
}
