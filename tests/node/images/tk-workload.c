/* The node tier's workload: does a counted amount of work that a test can compare with
 * what tracekeeper reports. Static, not stripped: tk_workload_tick is the uprobe target,
 * and this binary exists only inside the workload image, never on the host.
 *   tk-workload opens N PATH   open(2) and close PATH N times
 *   tk-workload ticks N        call tk_workload_tick() N times                      */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) int tk_workload_tick(int i) {
    __asm__ volatile("" ::: "memory"); /* not inlined or folded away */
    return i + 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "opens") == 0) {
        long n = atol(argv[2]);
        for (long i = 0; i < n; i++) {
            int fd = open(argv[3], O_RDONLY);
            if (fd < 0) { perror(argv[3]); return 1; }
            close(fd);
        }
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "ticks") == 0) {
        long n = atol(argv[2]);
        int acc = 0;
        for (long i = 0; i < n; i++) acc = tk_workload_tick(acc);
        printf("%d\n", acc);
        return 0;
    }
    fprintf(stderr, "usage: tk-workload opens N PATH | ticks N\n");
    return 2;
}
