/* tracekeeper probe team-a/probe (syscall, histogram) */
#define TK_FILTER_CGROUP 1
#define TK_FILTER_PID 0
#define TK_FILTER_COMM 0
#define TK_FOLLOW_CHILDREN 0
#define TK_HOST_WIDE 0
#define TK_SAMPLING 10
#define TK_OUTPUT_COUNT 0
#define TK_OUTPUT_HISTOGRAM 1
#define TK_OUTPUT_EVENTS 0
#define TK_BY_CGROUP 1
#define TK_BY_PID 0
#define TK_BY_COMM 1
#define TK_RATE_LIMIT 0
#define TK_MAX_CGROUPS 16384
#define TK_MAX_PIDS 65536
#define TK_MAX_KEYS 10240
#define TK_MAX_LEVEL 16
#define TK_RING_PAGES 512
/* ... c_prelude.h ... */


BPF_TABLE("lru_hash", u64, u64, tk_start, 65536);
TRACEPOINT_PROBE(syscalls, sys_enter_read) {
    if (!tk_admit())
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u64 ts = bpf_ktime_get_ns();
    tk_start.update(&id, &ts);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read) {
    u64 id = bpf_get_current_pid_tgid();
    u64 *start = tk_start.lookup(&id);
    if (!start)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *start;
    tk_start.delete(&id);
    tk_observe(delta);
    return 0;
}
