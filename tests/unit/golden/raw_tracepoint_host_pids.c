/* tracekeeper probe team-a/probe (rawTracepoint, count) */
#define TK_FILTER_CGROUP 0
#define TK_FILTER_PID 1
#define TK_FILTER_COMM 0
#define TK_FOLLOW_CHILDREN 1
#define TK_HOST_WIDE 0
#define TK_SAMPLING 1
#define TK_OUTPUT_COUNT 1
#define TK_OUTPUT_HISTOGRAM 0
#define TK_OUTPUT_EVENTS 0
#define TK_BY_CGROUP 0
#define TK_BY_PID 1
#define TK_BY_COMM 0
#define TK_RATE_LIMIT 0
#define TK_MAX_CGROUPS 16384
#define TK_MAX_PIDS 65536
#define TK_MAX_KEYS 10240
#define TK_MAX_LEVEL 16
#define TK_RING_PAGES 512
/* ... c_prelude.h ... */


RAW_TRACEPOINT_PROBE(sched_switch) {
    if (!tk_admit())
        return 0;
    TK_COUNT();
    return 0;
}
