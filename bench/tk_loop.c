/* tk_loop: the benchmarks' syscall generator, compiled at bench time with the system cc.
 *
 * Calls getppid() (through syscall(2), never a libc cache) N times and prints, on one
 * line of key=value pairs, what it did with CLOCK_MONOTONIC timestamps (the clock of
 * bpf_ktime_get_ns() and Python's time.monotonic_ns()). In the tight loop it also times
 * chunks of 10 000 calls and prints the 10th percentile and the median of their ns/call:
 * on a shared machine, chunks where the loop was preempted are slow, the fast ones are not.
 *
 *   -P dir   mkdir this directory first (a pod cgroup), as a runtime would
 *   -D us    then sleep this long
 *   -M dir   mkdir this directory (a container cgroup)
 *   -c dir   move this process into that cgroup (write its pid to dir/cgroup.procs)
 *   -C dir   instead, run the calls in a child started inside that cgroup by clone3
 *            (CLONE_INTO_CGROUP: no migration, as a runtime such as crun can)
 *   -a cpu   pin to this CPU
 *   -w N     warm-up calls, not timed
 *   -n N     timed calls
 *   -s ns    one call every ns nanoseconds, busy-waiting (a schedule: late calls catch up)
 *   -r rate  calls per second, in 1 ms ticks with sleeps in between (with -t seconds)
 *   -t sec   duration for -r (N = rate * sec)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, const char *arg) {
    fprintf(stderr, "tk_loop: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(2);
}

static void make_dir(const char *dir) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        die("mkdir", dir);
}

static void enter_cgroup(const char *dir) {
    char path[4096], pid[32];
    snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        die("open", path);
    int len = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    if (write(fd, pid, (size_t)len) != len)
        die("write", path);
    close(fd);
}

/* Returns in the child (0) and the parent (the child's pid), like fork(). */
static pid_t clone_into(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die("open", dir);
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)fd;
    long pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0)
        die("clone3 into", dir);
    if (pid > 0)
        close(fd);
    return (pid_t)pid;
}

#define CHUNK 10000ull
#define MAX_CHUNKS 4096ull
static uint64_t chunk_ns[MAX_CHUNKS];
static uint64_t nchunks;

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

int main(int argc, char **argv) {
    const char *pod = NULL, *container = NULL, *cgroup = NULL, *clone_cgroup = NULL;
    long delay_us = 0, cpu = -1;
    uint64_t warmup = 0, n = 1000000, spacing = 0, rate = 0;
    double seconds = 0;
    int opt;
    while ((opt = getopt(argc, argv, "P:D:M:c:C:a:w:n:s:r:t:")) != -1) {
        switch (opt) {
        case 'P': pod = optarg; break;
        case 'D': delay_us = atol(optarg); break;
        case 'M': container = optarg; break;
        case 'c': cgroup = optarg; break;
        case 'C': clone_cgroup = optarg; break;
        case 'a': cpu = atol(optarg); break;
        case 'w': warmup = strtoull(optarg, NULL, 10); break;
        case 'n': n = strtoull(optarg, NULL, 10); break;
        case 's': spacing = strtoull(optarg, NULL, 10); break;
        case 'r': rate = strtoull(optarg, NULL, 10); break;
        case 't': seconds = atof(optarg); break;
        default:
            fprintf(stderr, "usage: tk_loop [-P dir] [-D us] [-M dir] [-c dir] [-a cpu] "
                            "[-C dir] [-w N] [-n N] [-s ns | -r rate -t sec]\n");
            return 2;
        }
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0)
            die("sched_setaffinity", NULL);
    }
    uint64_t t_pod = 0;
    if (pod) {
        make_dir(pod);
        t_pod = now_ns();
    }
    if (delay_us > 0) {
        struct timespec d = {.tv_sec = delay_us / 1000000, .tv_nsec = (delay_us % 1000000) * 1000};
        nanosleep(&d, NULL);
    }
    if (container)
        make_dir(container);
    if (cgroup)
        enter_cgroup(cgroup);
    if (clone_cgroup) {
        fflush(stdout);
        pid_t child = clone_into(clone_cgroup);
        if (child > 0) {
            int status = 0;
            if (waitpid(child, &status, 0) < 0)
                die("waitpid", NULL);
            return WIFEXITED(status) ? WEXITSTATUS(status) : 3;
        }
    }
    if (rate > 0)
        n = (uint64_t)((double)rate * seconds);

    for (uint64_t i = 0; i < warmup; i++)
        syscall(SYS_getppid);

    uint64_t t0 = now_ns();
    if (rate > 0) {
        const uint64_t tick = 1000000; /* 1 ms */
        uint64_t done = 0, next = t0;
        while (done < n) {
            uint64_t due = (uint64_t)((double)(now_ns() - t0) * (double)rate / 1e9) + 1;
            if (due > n)
                due = n;
            for (; done < due; done++)
                syscall(SYS_getppid);
            next += tick;
            sleep_until(next);
        }
    } else if (spacing > 0) {
        for (uint64_t i = 0; i < n; i++) {
            uint64_t due = t0 + i * spacing;
            while (now_ns() < due) {
            }
            syscall(SYS_getppid);
        }
    } else {
        uint64_t chunks = n / CHUNK, c = 0;
        for (; c < chunks; c++) {
            uint64_t start = now_ns();
            for (uint64_t i = 0; i < CHUNK; i++)
                syscall(SYS_getppid);
            if (c < MAX_CHUNKS)
                chunk_ns[c] = now_ns() - start;
        }
        for (uint64_t i = chunks * CHUNK; i < n; i++)
            syscall(SYS_getppid);
        nchunks = chunks < MAX_CHUNKS ? chunks : MAX_CHUNKS;
    }
    uint64_t t1 = now_ns();
    double p10 = 0, p50 = 0;
    if (nchunks > 0) {
        qsort(chunk_ns, nchunks, sizeof(chunk_ns[0]), cmp_u64);
        p10 = (double)chunk_ns[nchunks / 10] / CHUNK;
        p50 = (double)chunk_ns[nchunks / 2] / CHUNK;
    }
    printf("calls=%llu ns_total=%llu ns_per_call=%.3f t_pod=%llu t_start=%llu t_end=%llu "
           "chunks=%llu chunk_p10=%.3f chunk_p50=%.3f\n",
           (unsigned long long)n, (unsigned long long)(t1 - t0),
           n ? (double)(t1 - t0) / (double)n : 0.0, (unsigned long long)t_pod,
           (unsigned long long)t0, (unsigned long long)t1, (unsigned long long)nchunks, p10, p50);
    return 0;
}
