/*
 * ecdit_plugin_v1.h -- the ecdit plugin ABI, version 1. FROZEN: never edit.
 *
 * Kept so version 1 libraries can still be built and tested. An ecdit host of
 * ABI version 2 still loads version 1 router and scheduler libraries; it refuses
 * a version 1 library with backends (they passed host slices where version 2
 * passes device buffers). New plugins use ecdit_plugin.h.
 *
 * A plugin is a shared library exporting one function,
 *
 *     const ecdit_plugin *ecdit_plugin_entry(const ecdit_host *host);
 *
 * that returns a descriptor valid for the life of the process. The descriptor
 * lists vtables, one per component kind (router, scheduler, backend); each
 * vtable's `create` makes opaque instance handles.
 *
 * Rules (the host checks the first three at load and refuses the plugin):
 *  - abi_version of every descriptor and vtable equals ECDIT_ABI_VERSION;
 *  - struct_size is at least the size this header gives (descriptors are only
 *    ever appended to; hosts read them through struct_size);
 *  - every function slot is non-null; params_json is a JSON array of
 *    {"name": ..., "type": "float"|"int"|"bool"|"str"|"groups"|"optional_float"|
 *     "json"|{"choice": [...]}, "default": value, "help": ...}
 *    where an absent "default" makes the parameter required;
 *  - argument order: handle, outputs, inputs, dimensions, err;
 *  - fallible functions return ECDIT_OK or ECDIT_ERROR (ECDIT_PANIC for a
 *    caught panic/exception) and then write a NUL-terminated message of at most
 *    err->cap bytes into err->msg;
 *  - an optional buffer is a NULL pointer; a zero-length buffer may have any pointer;
 *  - instance handles may be called from several threads at once;
 *  - never let an exception or longjmp cross the boundary.
 *
 * The host validates every dispatch a router returns (token indices in range,
 * no token twice under one expert, gates finite and in [0, 1]).
 *
 * The Rust mirror is ecdit_engine::plugin::abi_v1; a test checks that both agree
 * on every size and offset.
 */
#ifndef ECDIT_PLUGIN_V1_H
#define ECDIT_PLUGIN_V1_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ECDIT_ABI_VERSION 1u
#define ECDIT_ENTRY_SYMBOL "ecdit_plugin_entry"

#define ECDIT_OK 0
#define ECDIT_ERROR 1
#define ECDIT_PANIC 2

#define ECDIT_LOG_ERROR 1u
#define ECDIT_LOG_WARN 2u
#define ECDIT_LOG_INFO 3u
#define ECDIT_LOG_DEBUG 4u
#define ECDIT_LOG_TRACE 5u

#define ECDIT_UNARY_GELU_TANH 0u
#define ECDIT_UNARY_SILU 1u

#if defined(_WIN32)
#define ECDIT_EXPORT __declspec(dllexport)
#else
#define ECDIT_EXPORT __attribute__((visibility("default")))
#endif

typedef void (*ecdit_log_fn)(uint32_t level, const char *target, const char *msg);

/* What the host hands the entry function. */
typedef struct ecdit_host {
    uint32_t abi_version;
    uint32_t struct_size;
    ecdit_log_fn log;   /* lines reach the host's tracing subscriber */
    uint32_t max_level; /* most verbose ECDIT_LOG_* level recorded; 0 = off */
} ecdit_host;

typedef struct ecdit_err {
    char *msg;
    size_t cap;
} ecdit_err;

typedef struct ecdit_f32s { const float *ptr; size_t len; } ecdit_f32s;
typedef struct ecdit_f32s_mut { float *ptr; size_t len; } ecdit_f32s_mut;
typedef struct ecdit_u32s { const uint32_t *ptr; size_t len; } ecdit_u32s;
typedef struct ecdit_u32s_mut { uint32_t *ptr; size_t len; } ecdit_u32s_mut;
typedef struct ecdit_u8s { const uint8_t *ptr; size_t len; } ecdit_u8s;

struct ecdit_router_vtable;
struct ecdit_scheduler_vtable;
struct ecdit_backend_vtable;

typedef struct ecdit_plugin {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *name;
    const char *version;
    size_t n_routers;
    const struct ecdit_router_vtable *const *routers;
    size_t n_schedulers;
    const struct ecdit_scheduler_vtable *const *schedulers;
    size_t n_backends;
    const struct ecdit_backend_vtable *const *backends;
} ecdit_plugin;

typedef const ecdit_plugin *(*ecdit_entry_fn)(const ecdit_host *host);

/* Makes an instance from the complete parameter object (JSON text of len bytes,
 * defaults filled in by the host). ctx is the vtable's ctx. */
typedef int32_t (*ecdit_create_fn)(const void *ctx, const char *params_json, size_t len, void **out, ecdit_err *err);
typedef void (*ecdit_destroy_fn)(void *handle);

/* A dispatch in expert-major CSR form, plus router probabilities and aux loss. */
typedef struct ecdit_routing_view {
    size_t experts;
    size_t tokens_total;
    const size_t *offsets;  /* experts + 1 */
    const uint32_t *tokens; /* slots */
    const float *gates;     /* slots */
    size_t slots;
    const float *probs;     /* [tokens_total, experts] */
    size_t probs_len;
    uint32_t has_aux;
    float aux_loss;
    size_t group_size;      /* tokens per routing group the call used */
} ecdit_routing_view;

typedef struct ecdit_router_vtable {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *kind;
    const char *description;
    const char *params_json;
    const void *ctx;
    ecdit_create_fn create;
    ecdit_destroy_fn destroy;
    /* Fills *out_view with buffers owned by *out_result (freed by free_result). */
    int32_t (*route)(void *handle, ecdit_routing_view *out_view, void **out_result, ecdit_f32s scores,
                     size_t samples, size_t tokens_per_sample, size_t experts, ecdit_err *err);
    void (*free_result)(void *result);
    /* grad_scores [tokens, experts] is overwritten; grad_gates aligns with routing->gates. */
    int32_t (*backward)(void *handle, ecdit_f32s_mut grad_scores, const ecdit_routing_view *routing,
                        ecdit_f32s scores, ecdit_f32s grad_gates, float grad_aux, ecdit_err *err);
} ecdit_router_vtable;

/* The host's random generator, lent for one call. */
typedef struct ecdit_rng {
    void *ctx;
    uint32_t (*next_u32)(void *ctx);
    uint64_t (*next_u64)(void *ctx);
    void (*fill_bytes)(void *ctx, uint8_t *out, size_t len);
} ecdit_rng;

typedef struct ecdit_scheduler_vtable {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *kind;
    const char *description;
    const char *params_json;
    const void *ctx;
    ecdit_create_fn create;
    ecdit_destroy_fn destroy;
    int32_t (*draw_t)(void *handle, float *t, const ecdit_rng *rng, ecdit_err *err);
    int32_t (*add_noise)(void *handle, ecdit_f32s_mut x_t, ecdit_f32s x0, ecdit_f32s noise, float t, ecdit_err *err);
    int32_t (*target)(void *handle, ecdit_f32s_mut target, ecdit_f32s x0, ecdit_f32s noise, float t, ecdit_err *err);
    int32_t (*model_time)(void *handle, float *out, float t, ecdit_err *err);
    int32_t (*sampling_times)(void *handle, ecdit_f32s_mut out, size_t steps, ecdit_err *err);
    int32_t (*step)(void *handle, ecdit_f32s_mut x, ecdit_f32s model_out, float t, float t_next, ecdit_err *err);
} ecdit_scheduler_vtable;

typedef struct ecdit_gemm_dims {
    size_t m, n, k;
    uint32_t trans_a;
    uint32_t trans_b;
} ecdit_gemm_dims;

typedef struct ecdit_attn_dims {
    size_t batch, heads, kv_heads, q_len, kv_len, head_dim;
} ecdit_attn_dims;

typedef struct ecdit_adamw {
    float lr, beta1, beta2, eps, weight_decay;
} ecdit_adamw;

/* One slot per method of the Backend trait (engine/src/backend.rs documents each op). */
typedef struct ecdit_backend_vtable {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *kind;
    const char *description;
    const char *params_json;
    const void *ctx;
    ecdit_create_fn create;
    ecdit_destroy_fn destroy;
    const char *(*name)(void *h);
    size_t (*threads)(void *h);
    int32_t (*gemm)(void *h, ecdit_f32s_mut out, ecdit_f32s a, ecdit_f32s b, ecdit_gemm_dims dims, float alpha,
                    float beta, ecdit_err *err);
    int32_t (*gemm_batched)(void *h, ecdit_f32s_mut out, ecdit_f32s a, ecdit_f32s b, size_t batch,
                            ecdit_gemm_dims dims, float alpha, float beta, ecdit_err *err);
    int32_t (*add_bias)(void *h, ecdit_f32s_mut out, ecdit_f32s bias, size_t rows, size_t cols, ecdit_err *err);
    int32_t (*sum_rows)(void *h, ecdit_f32s_mut out, ecdit_f32s inp, size_t rows, size_t cols, uint32_t accumulate,
                        ecdit_err *err);
    int32_t (*softmax_rows)(void *h, ecdit_f32s_mut out, ecdit_f32s inp, size_t rows, size_t cols, ecdit_err *err);
    int32_t (*softmax_rows_backward)(void *h, ecdit_f32s_mut dinp, ecdit_f32s dout, ecdit_f32s out, size_t rows,
                                     size_t cols, ecdit_err *err);
    int32_t (*layer_norm)(void *h, ecdit_f32s_mut out, ecdit_f32s_mut mean, ecdit_f32s_mut rstd, ecdit_f32s inp,
                          ecdit_f32s weight, ecdit_f32s bias, size_t rows, size_t cols, float eps, ecdit_err *err);
    int32_t (*layer_norm_backward)(void *h, ecdit_f32s_mut dinp, ecdit_f32s_mut dweight, ecdit_f32s_mut dbias,
                                   ecdit_f32s dout, ecdit_f32s inp, ecdit_f32s mean, ecdit_f32s rstd,
                                   ecdit_f32s weight, size_t rows, size_t cols, ecdit_err *err);
    int32_t (*unary)(void *h, uint32_t op, ecdit_f32s_mut out, ecdit_f32s inp, ecdit_err *err);
    int32_t (*unary_backward)(void *h, uint32_t op, ecdit_f32s_mut dinp, ecdit_f32s dout, ecdit_f32s inp,
                              ecdit_err *err);
    int32_t (*attention)(void *h, ecdit_f32s_mut out, ecdit_f32s_mut probs, ecdit_f32s q, ecdit_f32s k,
                         ecdit_f32s v, ecdit_u8s key_mask, ecdit_attn_dims dims, ecdit_err *err);
    int32_t (*attention_backward)(void *h, ecdit_f32s_mut dq, ecdit_f32s_mut dk, ecdit_f32s_mut dv, ecdit_f32s dout,
                                  ecdit_f32s probs, ecdit_f32s q, ecdit_f32s k, ecdit_f32s v, ecdit_attn_dims dims,
                                  ecdit_err *err);
    int32_t (*gather_rows)(void *h, ecdit_f32s_mut out, ecdit_f32s inp, ecdit_u32s idx, size_t cols, ecdit_err *err);
    int32_t (*scatter_add_rows)(void *h, ecdit_f32s_mut out, ecdit_f32s inp, ecdit_u32s idx, ecdit_f32s scale,
                                size_t cols, ecdit_err *err);
    int32_t (*top_k_rows)(void *h, ecdit_u32s_mut idx, ecdit_f32s_mut val, ecdit_f32s inp, size_t rows, size_t cols,
                          size_t k, ecdit_err *err);
    int32_t (*adamw_step)(void *h, ecdit_f32s_mut param, ecdit_f32s grad, ecdit_f32s_mut m, ecdit_f32s_mut v,
                          ecdit_adamw hp, uint64_t step, ecdit_err *err);
} ecdit_backend_vtable;

#ifdef __cplusplus
}
#endif

#endif /* ECDIT_PLUGIN_V1_H */
