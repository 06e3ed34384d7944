/* tracekeeper cgroup claims: pod cgroups recognised by the kernel at mkdir (one per node).
 *
 * The agent writes the paths kubelet will give pending pods (targeted, no cgroup yet) into
 * tk_pending, each with the pod's slot. cgroup_mkdir fires inside mkdir(2), after the
 * cgroup is created and before its directory is activated: nobody can open it, so no
 * process can be moved or cloned into it yet. Writing `id -> slot` into the node-wide
 * identity table here puts the pod's entry in place before its first process runs; the
 * probes' ancestor walk makes it cover every container cgroup made below it. Ids are fresh
 * (kernfs never reuses one while the system runs), so no probe's verdict cache can hold an
 * older answer for it. cgroup_rmdir deletes the entry of a removed cgroup, whoever wrote it.
 * The constants (#define TK_*) come from programs/constants.py.
 */

/* Node-wide cgroup id -> pod slot, shared with every probe program (c_prelude.h). */
BPF_TABLE_PINNED("hash", u64, u32, tk_identity, TK_MAX_IDENTITIES, TK_IDENTITY_PIN);

struct tk_pending_path {
    u32 slot;
    u32 len;
    char path[TK_MAX_CGROUP_PATH];
};
/* FNV-1a 64 of a path -> the pod slot and the path itself: the hash finds the entry, the
 * whole path is compared, so no crafted name elsewhere in the tree can take a pod's slot. */
BPF_HASH(tk_pending, u64, struct tk_pending_path, TK_MAX_PENDING);

struct tk_path_buf {
    char c[TK_MAX_CGROUP_PATH + 1];
};
BPF_PERCPU_ARRAY(tk_path_scratch, struct tk_path_buf, 1);
BPF_PERCPU_ARRAY(tk_claim_counters, u64, TK_NCLAIM_COUNTERS);

static __always_inline void tk_claim_inc(u32 which) {
    u64 *v = tk_claim_counters.lookup(&which);
    if (v)
        (*v)++;
}

TRACEPOINT_PROBE(cgroup, cgroup_mkdir) {
    if (args->root != TK_CGROUP2_HIERARCHY)
        return 0;
    tk_claim_inc(TK_CLAIM_MKDIRS);
    u32 zero = 0;
    struct tk_path_buf *buf = tk_path_scratch.lookup(&zero);
    if (!buf)
        return 0;
    int got = bpf_probe_read_kernel_str(buf->c, sizeof(buf->c),
                                        (char *)args + (args->data_loc_path & 0xFFFF));
    if (got <= 1 || got > TK_MAX_CGROUP_PATH + 1)
        return 0; /* empty, failed, or longer than any pending path (read truncated) */
    u32 len = got - 1;
    /* Hidden from clang, so that it keeps the loops' constant bound, which is what the
     * verifier checks the buffer accesses against. */
    asm volatile("" : "+r"(len));
    u64 h = TK_FNV_OFFSET;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < TK_MAX_CGROUP_PATH && i < len; i++) {
        h ^= (u8)buf->c[i];
        h *= TK_FNV_PRIME;
    }
    struct tk_pending_path *want = tk_pending.lookup(&h);
    if (!want || want->len != len)
        return 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < TK_MAX_CGROUP_PATH && i < len; i++) {
        if (want->path[i] != buf->c[i])
            return 0;
    }
    u64 id = args->id;
    u32 slot = want->slot;
    if (tk_identity.update(&id, &slot) == 0)
        tk_claim_inc(TK_CLAIM_CLAIMED);
    else
        tk_claim_inc(TK_CLAIM_IDENTITY_FULL);
    return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir) {
    if (args->root != TK_CGROUP2_HIERARCHY)
        return 0;
    u64 id = args->id;
    if (tk_identity.delete(&id) == 0)
        tk_claim_inc(TK_CLAIM_REMOVED);
    return 0;
}
