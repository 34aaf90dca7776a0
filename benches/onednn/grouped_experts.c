/* The experts of one MoE layer (8 experts of 512 rows, d 384, width 4d; bf16,
 * packed weights, bias, GELU fused into the first product, k in chunks of
 * 768) run two ways, beside the dense FFN of equal FLOPs (2048 rows, width
 * 8d), interleaved in one process:
 *   team:  one expert after another, each product on all OpenMP threads
 *          (the CPU backend's grouped products before issue 13's sixth slice);
 *   tasks: the experts shared out over the threads, each expert's product
 *          on its thread alone (primitives built for one thread, user
 *          scratchpads), all first products, then all second ones;
 *   fused: the same, but each thread runs both products of an expert
 *          before the next (its hidden rows still in cache);
 *   dense: the dense FFN, each product on all threads.
 * Prints the median of each. The measurement behind the backend's grouped
 * products in tasks (plugins/backend-cpu/src/onednn/grouped.rs).
 *
 *   apt-get install libdnnl-dev
 *   cc -O2 -fopenmp benches/onednn/grouped_experts.c -ldnnl -o /tmp/grouped_experts
 *   /tmp/grouped_experts 2        # threads
 */
#include <dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(x)                                                    \
    do {                                                            \
        dnnl_status_t s_ = (x);                                     \
        if (s_ != dnnl_success) {                                   \
            fprintf(stderr, "%s failed: status %d\n", #x, (int)s_); \
            exit(1);                                                \
        }                                                           \
    } while (0)

enum { D = 384, EXPERTS = 8, ROWS = 512, K_CHUNK = 768, MAX_CHUNKS = 4 };

static dnnl_engine_t engine;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void *filled(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    memset(p, 0x3c, bytes); /* written: not one shared zero page */
    return p;
}

/* One k chunk of [m, k] @ [k, n] (+ bias on the first, GELU on the last,
 * adding onto dst after the first), bf16 in and out, packed weights. */
typedef struct {
    dnnl_primitive_t prim;
    dnnl_memory_desc_t src_md, dst_md, bias_md, scratch_md;
    const dnnl_memory_desc_t *w_md;
    void *w;
    size_t scratch_bytes;
    int first;
} chunk;

typedef struct {
    chunk c[MAX_CHUNKS];
    int chunks;
    long m, n, k;
} product;

static product make(long m, long n, long k, int gelu, int threads, int user_scratchpad) {
    product p = {.m = m, .n = n, .k = k};
    p.chunks = (int)((k + K_CHUNK - 1) / K_CHUNK);
    long kc = k / p.chunks;
    omp_set_num_threads(threads);
    for (int i = 0; i < p.chunks; i++) {
        chunk *c = &p.c[i];
        c->first = i == 0;
        dnnl_memory_desc_t w_any;
        dnnl_dims_t a_dims = {m, kc}, a_strides = {k, 1}, w_dims = {kc, n}, c_dims = {m, n}, b_dims = {1, n};
        CHECK(dnnl_memory_desc_init_by_strides(&c->src_md, 2, a_dims, dnnl_bf16, a_strides));
        CHECK(dnnl_memory_desc_init_by_tag(&w_any, 2, w_dims, dnnl_bf16, dnnl_format_tag_any));
        CHECK(dnnl_memory_desc_init_by_tag(&c->dst_md, 2, c_dims, dnnl_bf16, dnnl_ab));
        CHECK(dnnl_memory_desc_init_by_tag(&c->bias_md, 2, b_dims, dnnl_f32, dnnl_ab));
        dnnl_matmul_desc_t desc;
        CHECK(dnnl_matmul_desc_init(&desc, &c->src_md, &w_any, c->first ? &c->bias_md : NULL, &c->dst_md));
        dnnl_primitive_attr_t attr;
        CHECK(dnnl_primitive_attr_create(&attr));
        dnnl_post_ops_t ops;
        CHECK(dnnl_post_ops_create(&ops));
        if (!c->first)
            CHECK(dnnl_post_ops_append_sum(ops, 1.0f));
        if (gelu && i == p.chunks - 1)
            CHECK(dnnl_post_ops_append_eltwise(ops, 1.0f, dnnl_eltwise_gelu_tanh, 0.f, 0.f));
        CHECK(dnnl_primitive_attr_set_post_ops(attr, ops));
        if (user_scratchpad)
            CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
        dnnl_primitive_desc_t pd;
        CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, engine, NULL));
        c->w_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        c->w = filled(dnnl_memory_desc_get_size(c->w_md));
        if (user_scratchpad) {
            c->scratch_md = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
            c->scratch_bytes = dnnl_memory_desc_get_size(&c->scratch_md);
        }
        CHECK(dnnl_primitive_create(&c->prim, pd));
    }
    return p;
}

/* Runs p on stream: a [m, k] bf16 (row stride k), bias [n] f32, dst [m, n]. */
static void run(product *p, dnnl_stream_t stream, void *a, void *bias, void *dst, void *scratch) {
    for (int i = 0; i < p->chunks; i++) {
        chunk *c = &p->c[i];
        dnnl_memory_t mem[5];
        dnnl_exec_arg_t args[5];
        int n = 0;
        char *a_chunk = (char *)a + (size_t)i * (p->k / p->chunks) * 2;
        CHECK(dnnl_memory_create(&mem[n], &c->src_md, engine, a_chunk));
        args[n] = (dnnl_exec_arg_t){DNNL_ARG_SRC, mem[n]}, n++;
        CHECK(dnnl_memory_create(&mem[n], c->w_md, engine, c->w));
        args[n] = (dnnl_exec_arg_t){DNNL_ARG_WEIGHTS, mem[n]}, n++;
        CHECK(dnnl_memory_create(&mem[n], &c->dst_md, engine, dst));
        args[n] = (dnnl_exec_arg_t){DNNL_ARG_DST, mem[n]}, n++;
        if (c->first) {
            CHECK(dnnl_memory_create(&mem[n], &c->bias_md, engine, bias));
            args[n] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, mem[n]}, n++;
        }
        if (scratch) {
            CHECK(dnnl_memory_create(&mem[n], &c->scratch_md, engine, scratch));
            args[n] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, mem[n]}, n++;
        }
        CHECK(dnnl_primitive_execute(c->prim, stream, n, args));
        CHECK(dnnl_stream_wait(stream));
        for (int j = 0; j < n; j++)
            CHECK(dnnl_memory_destroy(mem[j]));
    }
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    CHECK(dnnl_engine_create(&engine, dnnl_cpu, 0));
    dnnl_stream_t team_stream;
    CHECK(dnnl_stream_create(&team_stream, engine, dnnl_stream_default_flags));
    long h = 4 * D, dense_h = 8 * D, rows = (long)EXPERTS * ROWS / 2;
    /* Each expert's weights and biases of its own, as in the model. */
    product team_fc1[EXPERTS], team_fc2[EXPERTS], task_fc1[EXPERTS], task_fc2[EXPERTS];
    for (int e = 0; e < EXPERTS; e++) {
        team_fc1[e] = make(ROWS, h, D, 1, threads, 0);
        team_fc2[e] = make(ROWS, D, h, 0, threads, 0);
        task_fc1[e] = make(ROWS, h, D, 1, 1, 1);
        task_fc2[e] = make(ROWS, D, h, 0, 1, 1);
    }
    product dense_fc1 = make(rows, dense_h, D, 1, threads, 0), dense_fc2 = make(rows, D, dense_h, 0, threads, 0);
    omp_set_num_threads(threads);
    char *xs = filled((size_t)EXPERTS * ROWS * D * 2), *hidden = filled((size_t)EXPERTS * ROWS * h * 2);
    char *ys = filled((size_t)EXPERTS * ROWS * D * 2), *bias = filled((size_t)dense_h * 4);
    char *dense_hidden = filled((size_t)rows * dense_h * 2);
    size_t scratch_bytes = 0;
    for (int e = 0; e < EXPERTS; e++)
        for (int i = 0; i < task_fc1[e].chunks || i < task_fc2[e].chunks; i++) {
            if (i < task_fc1[e].chunks && task_fc1[e].c[i].scratch_bytes > scratch_bytes)
                scratch_bytes = task_fc1[e].c[i].scratch_bytes;
            if (i < task_fc2[e].chunks && task_fc2[e].c[i].scratch_bytes > scratch_bytes)
                scratch_bytes = task_fc2[e].c[i].scratch_bytes;
        }
    enum { REPS = 41 };
    double t_team[REPS], t_tasks[REPS], t_fused[REPS], t_dense[REPS];
    for (int r = -3; r < REPS; r++) {
        double t0 = now();
        for (int e = 0; e < EXPERTS; e++)
            run(&team_fc1[e], team_stream, xs + (size_t)e * ROWS * D * 2, bias, hidden + (size_t)e * ROWS * h * 2, NULL);
        for (int e = 0; e < EXPERTS; e++)
            run(&team_fc2[e], team_stream, hidden + (size_t)e * ROWS * h * 2, bias, ys + (size_t)e * ROWS * D * 2, NULL);
        double t1 = now();
#pragma omp parallel num_threads(threads)
        {
            dnnl_stream_t s;
            CHECK(dnnl_stream_create(&s, engine, dnnl_stream_default_flags));
            void *scratch = filled(scratch_bytes + 64);
#pragma omp for schedule(dynamic, 1)
            for (int e = 0; e < EXPERTS; e++)
                run(&task_fc1[e], s, xs + (size_t)e * ROWS * D * 2, bias, hidden + (size_t)e * ROWS * h * 2, scratch);
#pragma omp for schedule(dynamic, 1)
            for (int e = 0; e < EXPERTS; e++)
                run(&task_fc2[e], s, hidden + (size_t)e * ROWS * h * 2, bias, ys + (size_t)e * ROWS * D * 2, scratch);
            free(scratch);
            CHECK(dnnl_stream_destroy(s));
        }
        double t_mid = now();
#pragma omp parallel num_threads(threads)
        {
            dnnl_stream_t s;
            CHECK(dnnl_stream_create(&s, engine, dnnl_stream_default_flags));
            void *scratch = filled(scratch_bytes + 64);
#pragma omp for schedule(dynamic, 1)
            for (int e = 0; e < EXPERTS; e++) {
                run(&task_fc1[e], s, xs + (size_t)e * ROWS * D * 2, bias, hidden + (size_t)e * ROWS * h * 2, scratch);
                run(&task_fc2[e], s, hidden + (size_t)e * ROWS * h * 2, bias, ys + (size_t)e * ROWS * D * 2, scratch);
            }
            free(scratch);
            CHECK(dnnl_stream_destroy(s));
        }
        double t2 = now();
        run(&dense_fc1, team_stream, xs, bias, dense_hidden, NULL);
        run(&dense_fc2, team_stream, dense_hidden, bias, ys, NULL);
        double t3 = now();
        if (r >= 0) {
            t_team[r] = t1 - t0;
            t_tasks[r] = t_mid - t1;
            t_fused[r] = t2 - t_mid;
            t_dense[r] = t3 - t2;
        }
    }
    qsort(t_team, REPS, sizeof(double), by_value);
    qsort(t_tasks, REPS, sizeof(double), by_value);
    qsort(t_fused, REPS, sizeof(double), by_value);
    qsort(t_dense, REPS, sizeof(double), by_value);
    double flop = 2.0 * 2 * EXPERTS * ROWS * D * h;
    printf("%d threads, bf16, %d experts x %d rows, d %d, width %ld; medians of %d interleaved runs\n", threads,
           EXPERTS, ROWS, D, h, REPS);
    printf("experts, team   %7.3f ms  %4.0f GFLOP/s\n", t_team[REPS / 2] * 1e3, flop / t_team[REPS / 2] * 1e-9);
    printf("experts, tasks  %7.3f ms  %4.0f GFLOP/s\n", t_tasks[REPS / 2] * 1e3, flop / t_tasks[REPS / 2] * 1e-9);
    printf("experts, fused  %7.3f ms  %4.0f GFLOP/s\n", t_fused[REPS / 2] * 1e3, flop / t_fused[REPS / 2] * 1e-9);
    printf("dense FFN       %7.3f ms  %4.0f GFLOP/s\n", t_dense[REPS / 2] * 1e3, flop / t_dense[REPS / 2] * 1e-9);
    return 0;
}
