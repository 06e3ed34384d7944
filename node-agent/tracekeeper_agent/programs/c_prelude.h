/* tracekeeper program prelude: shared filter, per-binding sampling and rate limit, outputs.
 *
 * One program serves every probe of one shape on the node; each probe is a binding, a bit
 * of a u64 mask. The constants (#define TK_*) come from programs/constants.py, the output
 * kind and keys (TK_OUTPUT_*, TK_BY_*) from the shape. Who is traced, sampling and rate
 * limits are map contents, written by the agent: changing them never recompiles.
 * A probe body starts with TK_ADMIT(): it leaves in tk_mask the bindings that keep the hit
 * (after filter and sampling), and returns when none does.
 * No kernel header but ptrace.h (pt_regs, for uprobes): each one is parsed on every
 * compile, and linux/sched.h alone doubled its time. Raw programs get sched.h back.
 */
#include <uapi/linux/ptrace.h>

/* Per-CPU counters per binding (index binding * TK_NCOUNTERS + counter), summed by the
 * agent at read time. */
BPF_PERCPU_ARRAY(tk_counters, u64, TK_MAX_BINDINGS * TK_NCOUNTERS);

static __always_inline void tk_inc(u32 binding, u32 which) {
    u32 i = binding * TK_NCOUNTERS + which;
    u64 *v = tk_counters.lookup(&i);
    if (v)
        (*v)++;
}

/* The lowest binding of a non-empty mask (bpf_log2l is log2 + 1). */
static __always_inline u32 tk_lowest(u64 mask) {
    return bpf_log2l(mask & -mask) - 1;
}

struct tk_config {
    u64 gen;          /* bumped by the agent after every filter change (verdict cache) */
    u64 host_mask;    /* bindings tracing every process (hostWide) */
    u64 no_comm_mask; /* bindings without a processNames filter */
    u64 follow_mask;  /* bindings whose pids' children are traced too */
    u64 flags;        /* TK_FLAG_*: filter kinds some binding uses */
};
BPF_ARRAY(tk_config, struct tk_config, 1);

struct tk_binding {
    u32 sampling;   /* keep 1 in sampling hits (0, 1: all) */
    u32 rate_limit; /* events per second (0: none) */
};
BPF_ARRAY(tk_bindings, struct tk_binding, TK_MAX_BINDINGS);

/* Node-wide, shared by every program: cgroup id (pod-level or container-level) -> pod slot.
 * A pod's entry is made once per node, whatever the number of probes tracing it. Its bpffs
 * path TK_IDENTITY_PIN is the loader's -D flag (the loader owns the table). */
BPF_TABLE_PINNED("hash", u64, u32, tk_identity, TK_MAX_IDENTITIES, TK_IDENTITY_PIN);
/* This program's bindings per pod slot. */
BPF_ARRAY(tk_slot_masks, u64, TK_MAX_SLOTS);

struct tk_verdict {
    u64 gen;
    u64 mask;
};
/* Verdict per current cgroup: a miss costs one lookup here in steady state, whatever the
 * number of bindings, instead of two per ancestor level. */
BPF_TABLE("lru_hash", u64, struct tk_verdict, tk_verdicts, TK_VERDICT_ENTRIES);

static __always_inline u64 tk_cgroup_mask(u64 gen) {
    u64 cg = bpf_get_current_cgroup_id();
    struct tk_verdict *cached = tk_verdicts.lookup(&cg);
    if (cached && cached->gen == gen)
        return cached->mask;
    u64 mask = 0;
    /* Level 1 is the root's child; a pod-level entry covers every container cgroup below
     * it, including containers created after the entry. */
#pragma unroll
    for (int level = 1; level <= TK_MAX_LEVEL; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0)
            break;
        u32 *slot = tk_identity.lookup(&id);
        if (slot) {
            u32 s = *slot;
            u64 *m = tk_slot_masks.lookup(&s);
            if (m)
                mask |= *m;
        }
    }
    struct tk_verdict v = {};
    v.gen = gen;
    v.mask = mask;
    tk_verdicts.update(&cg, &v);
    return mask;
}

BPF_HASH(tk_pids, u32, u64, TK_MAX_PIDS); /* agent: pid -> bindings */
#if TK_FOLLOW_CHILDREN
BPF_HASH(tk_child_pids, u32, u64, TK_MAX_CHILD_PIDS); /* kernel: live children of traced pids */
#endif

struct tk_comm {
    char name[TK_COMM_LEN];
};
BPF_HASH(tk_comms, struct tk_comm, u64, TK_MAX_COMMS); /* comm -> bindings naming it */

static __always_inline u64 tk_filter(void) {
    u32 zero = 0;
    struct tk_config *cfg = tk_config.lookup(&zero);
    if (!cfg)
        return 0;
    u64 flags = cfg->flags;
    u64 mask = cfg->host_mask;
    if (flags & TK_FLAG_CGROUP)
        mask |= tk_cgroup_mask(cfg->gen);
    if (flags & TK_FLAG_PID) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        u64 *m = tk_pids.lookup(&tgid);
        if (m)
            mask |= *m;
#if TK_FOLLOW_CHILDREN
        if (flags & TK_FLAG_FOLLOW) {
            m = tk_child_pids.lookup(&tgid);
            if (m)
                mask |= *m;
        }
#endif
    }
    if ((flags & TK_FLAG_COMM) && (mask & ~cfg->no_comm_mask)) {
        struct tk_comm c = {};
        bpf_get_current_comm(&c.name, sizeof(c.name));
        u64 *m = tk_comms.lookup(&c);
        mask &= cfg->no_comm_mask | (m ? *m : 0);
    }
    return mask;
}

/* Filter, then sampling per matched binding (1 in its sampling, decided here in kernel). */
static __always_inline u64 tk_admit(void) {
    u64 mask = tk_filter();
    u64 todo = mask;
    for (int n = 0; n < TK_MAX_BINDINGS && todo; n++) {
        u32 i = tk_lowest(todo);
        todo &= todo - 1;
        tk_inc(i, TK_MATCHED);
        struct tk_binding *b = tk_bindings.lookup(&i);
        if (b && b->sampling > 1 && bpf_get_prandom_u32() % b->sampling) {
            tk_inc(i, TK_SAMPLED_OUT);
            mask &= ~(1ULL << i);
        }
    }
    return mask;
}

#define TK_ADMIT()                 \
    u64 tk_mask = tk_admit();      \
    if (!tk_mask)                  \
        return 0

/* Aggregation key for count and histogram outputs: only the `by` keys are set. */
struct tk_key {
    u64 cgroup;
    u32 pid;
    u32 slot;
    u32 binding;
    u32 pad;
    char comm[TK_COMM_LEN];
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

/* One key per binding of the mask: each probe's series are its own. */
static __always_inline void tk_add(struct tk_key *k, u64 mask) {
    for (int n = 0; n < TK_MAX_BINDINGS && mask; n++) {
        u32 i = tk_lowest(mask);
        mask &= mask - 1;
        k->binding = i;
        u64 *v = tk_values.lookup(k);
        if (v) {
            (*v)++;
        } else {
            u64 one = 1;
            tk_values.update(k, &one);
            tk_inc(i, TK_NEW_KEYS);
        }
    }
}
#endif

#if TK_OUTPUT_COUNT
static __always_inline void tk_count(u64 mask) {
    struct tk_key k;
    tk_key_init(&k);
    tk_add(&k, mask);
}
#endif

#if TK_OUTPUT_HISTOGRAM
/* log2 buckets: slot s holds values in [2^s, 2^(s+1)); 0 lands in slot 0. */
static __always_inline void tk_observe(u64 mask, u64 value) {
    struct tk_key k;
    tk_key_init(&k);
    k.slot = bpf_log2l(value) - 1;
    tk_add(&k, mask);
}
#endif

#if TK_OUTPUT_EVENTS
BPF_RINGBUF_OUTPUT(tk_events, TK_RING_PAGES);

/* Token bucket per binding, refilled once per second to its rate_limit, shared by CPUs. */
struct tk_bucket {
    u64 window_start;
    u64 used;
};
BPF_ARRAY(tk_rate, struct tk_bucket, TK_MAX_BINDINGS);

/* The bindings of `mask` whose rate limit lets one more event through. */
static __always_inline u64 tk_rate_ok(u64 mask) {
    u64 todo = mask;
    for (int n = 0; n < TK_MAX_BINDINGS && todo; n++) {
        u32 i = tk_lowest(todo);
        todo &= todo - 1;
        struct tk_binding *cfg = tk_bindings.lookup(&i);
        if (!cfg || !cfg->rate_limit)
            continue;
        struct tk_bucket *b = tk_rate.lookup(&i);
        if (!b) {
            mask &= ~(1ULL << i);
            continue;
        }
        u64 now = bpf_ktime_get_ns();
        if (now - b->window_start >= 1000000000ULL) {
            /* Two CPUs may both refill at a window edge: at worst a few extra tokens. */
            b->window_start = now;
            b->used = 0;
        }
        if (__sync_fetch_and_add(&b->used, 1) >= cfg->rate_limit) {
            tk_inc(i, TK_RATE_LIMITED);
            mask &= ~(1ULL << i);
        }
    }
    return mask;
}

static __always_inline void tk_ring_full(u64 mask) {
    for (int n = 0; n < TK_MAX_BINDINGS && mask; n++) {
        u32 i = tk_lowest(mask);
        mask &= mask - 1;
        tk_inc(i, TK_RING_FULL);
    }
}

#define TK_EVENT_COMMON(e)                                   \
    do {                                                     \
        u64 __id = bpf_get_current_pid_tgid();               \
        (e)->bindings = tk_mask;                             \
        (e)->ts = bpf_ktime_get_ns();                        \
        (e)->cgroup = bpf_get_current_cgroup_id();           \
        (e)->pid = __id >> 32;                               \
        (e)->tid = (u32)__id;                                \
        bpf_get_current_comm(&(e)->comm, sizeof((e)->comm)); \
    } while (0)
#endif

#if TK_FOLLOW_CHILDREN
/* Children of traced pids are traced while they live, for the bindings that follow
 * children (TK_FLAG_FOLLOW); the kernel writes tk_child_pids, the agent never does. Only in
 * programs built for such bindings: each follower takes one of the 64 program slots of
 * sched_process_fork/exit, which every shape would otherwise use up. */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 zero = 0;
    struct tk_config *cfg = tk_config.lookup(&zero);
    if (!cfg || !(cfg->flags & TK_FLAG_FOLLOW))
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u64 mask = 0;
    u64 *m = tk_pids.lookup(&parent);
    if (m)
        mask |= *m;
    m = tk_child_pids.lookup(&parent);
    if (m)
        mask |= *m;
    mask &= cfg->follow_mask;
    if (mask) {
        u32 child = args->child_pid;
        tk_child_pids.update(&child, &mask);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid != (u32)id)
        return 0; /* a thread, not the process */
    u32 zero = 0;
    struct tk_config *cfg = tk_config.lookup(&zero);
    if (cfg && (cfg->flags & TK_FLAG_FOLLOW))
        tk_child_pids.delete(&tgid);
    return 0;
}
#endif

/* For raw programs (spec.program, never shared: binding 0 only). */
#define TK_FILTER() (tk_admit() & 1ULL)
#if TK_OUTPUT_COUNT
#define TK_COUNT() tk_count(1ULL)
#endif
