/* tracekeeper program prelude: filter, sampling, rate limit, outputs.
 *
 * The program builder puts #defines above this text; everything a probe does not
 * use is compiled out. A probe body calls tk_admit() first: it returns the binding
 * (>= 1) of the target that matched, or 0 to ignore the hit.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/* Per-CPU counters, summed by the agent at read time (no contention between CPUs). */
enum tk_counter { TK_MATCHED, TK_SAMPLED_OUT, TK_RATE_LIMITED, TK_RING_FULL, TK_NEW_KEYS, TK_NCOUNTERS };
BPF_PERCPU_ARRAY(tk_counters, u64, TK_NCOUNTERS);

static __always_inline void tk_inc(u32 which) {
    u64 *v = tk_counters.lookup(&which);
    if (v)
        (*v)++;
}

#if TK_FILTER_CGROUP
/* Targeted cgroups (pod-level or container-level), value = binding. */
BPF_HASH(tk_cgroups, u64, u32, TK_MAX_CGROUPS);
/* Bumped by the agent after every filter change: cached verdicts of an older
 * generation are recomputed, so no stale verdict survives an update. */
BPF_ARRAY(tk_gen, u64, 1);
struct tk_verdict {
    u64 gen;
    u32 binding;
};
/* Verdict per current cgroup: a miss costs one lookup here in steady state,
 * instead of one lookup per ancestor level. */
BPF_TABLE("lru_hash", u64, struct tk_verdict, tk_verdicts, 16384);

static __always_inline u32 tk_cgroup_match(void) {
    u64 cg = bpf_get_current_cgroup_id();
    u32 zero = 0;
    u64 *genp = tk_gen.lookup(&zero);
    u64 gen = genp ? *genp : 0;
    struct tk_verdict *cached = tk_verdicts.lookup(&cg);
    if (cached && cached->gen == gen)
        return cached->binding;
    u32 binding = 0;
    /* Level 1 is the root's child; a pod-level entry matches every container
     * cgroup below it, including containers created after the entry. */
#pragma unroll
    for (int level = 1; level <= TK_MAX_LEVEL; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0)
            break;
        u32 *b = tk_cgroups.lookup(&id);
        if (b) {
            binding = *b;
            break;
        }
    }
    struct tk_verdict v = {};
    v.gen = gen;
    v.binding = binding;
    tk_verdicts.update(&cg, &v);
    return binding;
}
#endif

#if TK_FILTER_PID
BPF_HASH(tk_pids, u32, u32, TK_MAX_PIDS);
#endif

#if TK_FILTER_COMM
struct tk_comm {
    char name[TASK_COMM_LEN];
};
BPF_HASH(tk_comms, struct tk_comm, u32, 64);
#endif

static __always_inline u32 tk_filter(void) {
    u32 binding = 0;
#if TK_HOST_WIDE
    binding = 1;
#endif
#if TK_FILTER_CGROUP
    if (!binding)
        binding = tk_cgroup_match();
#endif
#if TK_FILTER_PID
    if (!binding) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        u32 *b = tk_pids.lookup(&tgid);
        if (b)
            binding = *b & 0x7fffffffu; /* without TK_CHILD */
    }
#endif
#if TK_FILTER_COMM
    if (binding) {
        struct tk_comm c = {};
        bpf_get_current_comm(&c.name, sizeof(c.name));
        if (!tk_comms.lookup(&c))
            binding = 0;
    }
#endif
    return binding;
}

/* Filter, then sampling (1 in TK_SAMPLING, decided here in kernel). */
static __always_inline u32 tk_admit(void) {
    u32 binding = tk_filter();
    if (!binding)
        return 0;
    tk_inc(TK_MATCHED);
#if TK_SAMPLING > 1
    if (bpf_get_prandom_u32() % TK_SAMPLING) {
        tk_inc(TK_SAMPLED_OUT);
        return 0;
    }
#endif
    return binding;
}

/* Aggregation key for count and histogram outputs: only the `by` keys are set. */
struct tk_key {
    u64 cgroup;
    u32 pid;
    u32 slot;
    char comm[TASK_COMM_LEN];
};

static __always_inline void tk_key_init(struct tk_key *k) {
    __builtin_memset(k, 0, sizeof(*k));
#if TK_BY_CGROUP
    k->cgroup = bpf_get_current_cgroup_id();
#endif
#if TK_BY_PID
    k->pid = bpf_get_current_pid_tgid() >> 32;
#endif
#if TK_BY_COMM
    bpf_get_current_comm(&k->comm, sizeof(k->comm));
#endif
}

#if TK_OUTPUT_COUNT || TK_OUTPUT_HISTOGRAM
/* LRU: keys (pids, comms) are unbounded; an eviction is counted, never a map-full error. */
BPF_TABLE("lru_percpu_hash", struct tk_key, u64, tk_values, TK_MAX_KEYS);

static __always_inline void tk_add(struct tk_key *k) {
    u64 *v = tk_values.lookup(k);
    if (v) {
        (*v)++;
    } else {
        u64 one = 1;
        tk_values.update(k, &one);
        tk_inc(TK_NEW_KEYS);
    }
}
#endif

#if TK_OUTPUT_COUNT
static __always_inline void tk_count(void) {
    struct tk_key k;
    tk_key_init(&k);
    tk_add(&k);
}
#define TK_COUNT() tk_count()
#endif

#if TK_OUTPUT_HISTOGRAM
/* log2 buckets: slot s holds values in [2^s, 2^(s+1)); 0 lands in slot 0. */
static __always_inline void tk_observe(u64 value) {
    struct tk_key k;
    tk_key_init(&k);
    k.slot = bpf_log2l(value) - 1;
    tk_add(&k);
}
#endif

#if TK_OUTPUT_EVENTS
BPF_RINGBUF_OUTPUT(tk_events, TK_RING_PAGES);

#if TK_RATE_LIMIT
/* Token bucket refilled once per second to TK_RATE_LIMIT tokens, shared by all CPUs. */
struct tk_bucket {
    u64 window_start;
    u64 used;
};
BPF_ARRAY(tk_rate, struct tk_bucket, 1);

static __always_inline int tk_rate_ok(void) {
    u32 zero = 0;
    struct tk_bucket *b = tk_rate.lookup(&zero);
    if (!b)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now - b->window_start >= 1000000000ULL) {
        /* Two CPUs may both refill at a window edge: at worst a few extra tokens. */
        b->window_start = now;
        b->used = 0;
    }
    if (__sync_fetch_and_add(&b->used, 1) >= TK_RATE_LIMIT) {
        tk_inc(TK_RATE_LIMITED);
        return 0;
    }
    return 1;
}
#else
#define tk_rate_ok() 1
#endif

#define TK_EVENT_COMMON(e)                                   \
    do {                                                     \
        u64 __id = bpf_get_current_pid_tgid();               \
        (e)->ts = bpf_ktime_get_ns();                        \
        (e)->cgroup = bpf_get_current_cgroup_id();           \
        (e)->pid = __id >> 32;                               \
        (e)->tid = (u32)__id;                                \
        bpf_get_current_comm(&(e)->comm, sizeof((e)->comm)); \
    } while (0)
#endif

#if TK_FILTER_PID && TK_FOLLOW_CHILDREN
/* Children of traced PIDs are traced while they live. Their entries carry
 * TK_CHILD so that the agent's map sync leaves them alone and exit removes them. */
#define TK_CHILD 0x80000000u
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 *b = tk_pids.lookup(&parent);
    if (b) {
        u32 child = args->child_pid;
        u32 v = *b | TK_CHILD;
        tk_pids.update(&child, &v);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid != (u32)id)
        return 0; /* a thread, not the process */
    u32 *b = tk_pids.lookup(&tgid);
    if (b && (*b & TK_CHILD))
        tk_pids.delete(&tgid);
    return 0;
}
#endif

/* For raw programs (spec.program): the probe's filter and outputs as macros. */
#define TK_FILTER() tk_admit()
