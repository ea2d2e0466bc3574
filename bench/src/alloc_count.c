/* Counts every heap allocation a process makes (malloc, calloc, realloc, aligned
 * allocations), for the benchmark's allocations-per-request figure. Preloaded with
 * LD_PRELOAD; the counters live in the file named by GEM_ALLOC_COUNT_FILE (two
 * uint64_t: allocations, reallocations), mapped shared, so the benchmark reads them
 * while the process runs. Calls glibc's own entry points, so no dlsym bootstrap. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static uint64_t fallback[2];
static uint64_t *counts = fallback;

__attribute__((constructor)) static void open_counts(void) {
    const char *path = getenv("GEM_ALLOC_COUNT_FILE");
    if (!path) return;
    int fd = open(path, O_RDWR);
    if (fd < 0) return;
    void *m = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m != MAP_FAILED) counts = m;
}

static void count(int i) { __atomic_fetch_add(&counts[i], 1, __ATOMIC_RELAXED); }

void *malloc(size_t n) { count(0); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { count(0); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { count(p ? 1 : 0); return __libc_realloc(p, n); }
void *memalign(size_t a, size_t n) { count(0); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { count(0); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    count(0);
    void *p = __libc_memalign(a, n);
    if (!p) return 12; /* ENOMEM */
    *out = p;
    return 0;
}
