/* oneDNN matmul with plain row-major weights against the same product with
 * weights pre-packed in the layout the primitive picks (format "any"), run
 * interleaved in one process: the measurement behind the CPU backend's
 * packed weights (plugins/backend-cpu/src/onednn/packed.rs). Prints the
 * median of each and their ratio on the DiT-S shapes.
 *
 *   apt-get install libdnnl-dev
 *   cc -O2 -fopenmp benches/onednn/packed_weights.c -ldnnl -o /tmp/packed_weights
 *   /tmp/packed_weights 2 bf16     # threads, input dtype (bf16 or f32); f32 output
 */
#include <dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(x)                                                      \
    do {                                                              \
        dnnl_status_t s_ = (x);                                       \
        if (s_ != dnnl_success) {                                     \
            fprintf(stderr, "%s failed: status %d\n", #x, (int)s_);   \
            exit(1);                                                  \
        }                                                             \
    } while (0)

static dnnl_engine_t engine;
static dnnl_stream_t stream;

typedef struct {
    dnnl_primitive_t prim;
    dnnl_exec_arg_t args[3];
} product;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* [m, k] @ [k, n] -> f32 [m, n]; weights plain (ab) or in the primitive's layout. */
static product make(long m, long n, long k, dnnl_data_type_t src, int packed) {
    product p;
    dnnl_memory_desc_t a_md, w_md, c_md;
    dnnl_dims_t a_dims = {m, k}, w_dims = {k, n}, c_dims = {m, n};
    CHECK(dnnl_memory_desc_init_by_tag(&a_md, 2, a_dims, src, dnnl_ab));
    CHECK(dnnl_memory_desc_init_by_tag(&w_md, 2, w_dims, src, packed ? dnnl_format_tag_any : dnnl_ab));
    CHECK(dnnl_memory_desc_init_by_tag(&c_md, 2, c_dims, dnnl_f32, dnnl_ab));
    dnnl_matmul_desc_t desc;
    CHECK(dnnl_matmul_desc_init(&desc, &a_md, &w_md, NULL, &c_md));
    dnnl_primitive_desc_t pd;
    CHECK(dnnl_primitive_desc_create(&pd, &desc, NULL, engine, NULL));
    const dnnl_memory_desc_t *w_layout = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    CHECK(dnnl_primitive_create(&p.prim, pd));
    size_t elem = src == dnnl_bf16 ? 2 : 4;
    size_t w_bytes = dnnl_memory_desc_get_size(w_layout);
    void *a = malloc(m * k * elem), *w = malloc(w_bytes), *c = malloc(m * n * 4);
    /* Written, not calloc's untouched zero pages (which all map one page). */
    memset(a, 0x3c, m * k * elem);
    memset(w, 0x3c, w_bytes);
    memset(c, 0, m * n * 4);
    dnnl_memory_t a_mem, w_mem, c_mem;
    CHECK(dnnl_memory_create(&a_mem, &a_md, engine, a));
    CHECK(dnnl_memory_create(&w_mem, w_layout, engine, w));
    CHECK(dnnl_memory_create(&c_mem, &c_md, engine, c));
    p.args[0] = (dnnl_exec_arg_t){DNNL_ARG_SRC, a_mem};
    p.args[1] = (dnnl_exec_arg_t){DNNL_ARG_WEIGHTS, w_mem};
    p.args[2] = (dnnl_exec_arg_t){DNNL_ARG_DST, c_mem};
    return p;
}

static double run(product *p) {
    double t0 = now();
    CHECK(dnnl_primitive_execute(p->prim, stream, 3, p->args));
    CHECK(dnnl_stream_wait(stream));
    return now() - t0;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    dnnl_data_type_t src = argc > 2 && strcmp(argv[2], "f32") == 0 ? dnnl_f32 : dnnl_bf16;
    omp_set_num_threads(threads);
    CHECK(dnnl_engine_create(&engine, dnnl_cpu, 0));
    CHECK(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));
    /* DiT-S products at batch 8 (2048 rows) and 32 (8192), and the experts' (512). */
    long shapes[][3] = {{2048, 1152, 384}, {2048, 384, 384}, {2048, 1536, 384}, {2048, 384, 768},
                        {512, 1536, 384},  {512, 384, 768},  {256, 384, 384},  {64, 384, 384},
                        {8192, 1536, 384}, {8192, 384, 768}};
    printf("%d threads, %s inputs, f32 output; medians of interleaved runs\n", threads,
           src == dnnl_bf16 ? "bf16" : "f32");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        long m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        product plain = make(m, n, k, src, 0), packed = make(m, n, k, src, 1);
        enum { REPS = 61 };
        double tp[REPS], tk[REPS];
        for (int i = 0; i < 3; i++) {
            run(&plain);
            run(&packed);
        }
        for (int i = 0; i < REPS; i++) {
            tp[i] = run(&plain);
            tk[i] = run(&packed);
        }
        qsort(tp, REPS, sizeof(double), by_value);
        qsort(tk, REPS, sizeof(double), by_value);
        double flop = 2.0 * m * n * k, p = tp[REPS / 2], q = tk[REPS / 2];
        printf("m %5ld n %5ld k %5ld  plain %7.3f ms %4.0f GFLOP/s  packed %7.3f ms %4.0f GFLOP/s  packed/plain %.3f\n",
               m, n, k, p * 1e3, flop / p * 1e-9, q * 1e3, flop / q * 1e-9, q / p);
    }
    return 0;
}
