/*
 * ecdit_plugin.h -- the ecdit plugin ABI, version 2.
 *
 * A plugin is a shared library exporting one function,
 *
 *     const ecdit_plugin *ecdit_plugin_entry(const ecdit_host *host);
 *
 * that returns a descriptor valid for the life of the process. The descriptor
 * lists tables, one per component kind (router, scheduler, backend, expert);
 * each table's `create` makes opaque instance handles.
 *
 * Growing without breaking:
 *  - every descriptor and table starts with abi_version and struct_size. They
 *    are only ever appended to; the host reads each through its struct_size,
 *    and a slot beyond a shorter table reads as NULL;
 *  - a slot marked "optional" may be NULL and then takes the default written
 *    next to it; a NULL required slot refuses the plugin at load;
 *  - the descriptor and the host carry feature lists (NULL-terminated arrays
 *    of strings); unknown features are ignored. Slots appended later come with
 *    a feature name, not a new version. Version 2 features: "tensors",
 *    "experts", "router-hints".
 *
 * Rules (the host checks the first three at load and refuses the plugin):
 *  - abi_version of the descriptor and every table equals ECDIT_ABI_VERSION;
 *  - struct_size covers at least every required slot;
 *  - every required slot is non-null; params_json is a JSON array of
 *    {"name": ..., "type": "float"|"int"|"bool"|"str"|"groups"|"optional_float"|
 *     "json"|{"choice": [...]}, "default": value, "help": ...}
 *    where an absent "default" makes the parameter required;
 *  - argument order: handle, outputs, cached values, inputs, weights,
 *    dimensions, err;
 *  - fallible functions return ECDIT_OK or ECDIT_ERROR (ECDIT_PANIC for a
 *    caught panic/exception) and then write a NUL-terminated message of at most
 *    err->cap bytes into err->msg;
 *  - routers and schedulers work on host buffers (ecdit_f32s...): an optional
 *    buffer is a NULL pointer; a zero-length buffer may have any pointer;
 *  - backends and experts work on tensors (ecdit_tensor) naming a buffer handle
 *    of the backend instance that allocated it (buffers of another instance,
 *    even of the same table, are refused); an optional tensor is a NULL pointer;
 *  - no in-place ops: within one backend call, a tensor the op writes must not
 *    share a byte with any other tensor of the call (views of disjoint parts of
 *    one buffer are fine), nor with the host memory of upload/download; the
 *    host's lent backend refuses such a call ("in-place ops are not supported:
 *    out and inp overlap");
 *  - a count the plugin hands over (tables of one family, tensors of one call)
 *    is at most 4096;
 *  - instance handles may be called from several threads at once;
 *  - never let an exception or longjmp cross the boundary.
 *
 * The host validates every dispatch a router returns (at most tokens x experts
 * slots, token indices in range, no token twice under one expert, gates finite
 * and in [0, 1]).
 *
 * Version 1 (ecdit_plugin_v1.h): a version 1 router or scheduler library still
 * loads (its tables are prefixes of these); a version 1 library with backends
 * is refused, naming both versions.
 *
 * The Rust mirror is ecdit_engine::plugin::abi; a test checks that both agree
 * on every size and offset.
 */
#ifndef ECDIT_PLUGIN_H
#define ECDIT_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ECDIT_ABI_VERSION 2u
#define ECDIT_ENTRY_SYMBOL "ecdit_plugin_entry"

#define ECDIT_OK 0
#define ECDIT_ERROR 1
#define ECDIT_PANIC 2

#define ECDIT_LOG_ERROR 1u
#define ECDIT_LOG_WARN 2u
#define ECDIT_LOG_INFO 3u
#define ECDIT_LOG_DEBUG 4u
#define ECDIT_LOG_TRACE 5u

#define ECDIT_DTYPE_F32 0u
#define ECDIT_DTYPE_BF16 1u
#define ECDIT_DTYPE_U32 2u
#define ECDIT_DTYPE_U8 3u

#define ECDIT_UNARY_GELU_TANH 0u
#define ECDIT_UNARY_SILU 1u

#define ECDIT_MAX_RANK 6

#if defined(_WIN32)
#define ECDIT_EXPORT __declspec(dllexport)
#else
#define ECDIT_EXPORT __attribute__((visibility("default")))
#endif

typedef void (*ecdit_log_fn)(uint32_t level, const char *target, const char *msg);

/* What the host hands the entry function (the first four fields are version 1's). */
typedef struct ecdit_host {
    uint32_t abi_version;
    uint32_t struct_size;
    ecdit_log_fn log;            /* lines reach the host's tracing subscriber */
    uint32_t max_level;          /* most verbose ECDIT_LOG_* level recorded; 0 = off */
    const char *const *features; /* NULL-terminated; NULL = none */
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

/* A view of a backend buffer: contiguous row-major dims[0..rank] elements of
 * dtype, starting offset elements into the buffer. buffer is the handle the
 * owning backend's alloc returned. */
typedef struct ecdit_tensor {
    void *buffer;
    size_t offset;  /* in elements */
    uint32_t dtype; /* ECDIT_DTYPE_* */
    uint32_t rank;
    size_t dims[ECDIT_MAX_RANK];
} ecdit_tensor;

struct ecdit_router_vtable;
struct ecdit_scheduler_vtable;
struct ecdit_backend_vtable;
struct ecdit_expert_vtable;

/* The first ten fields are version 1's descriptor. */
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
    const char *const *features; /* optional, NULL-terminated; default: none */
    size_t n_experts;            /* optional; default: 0 */
    const struct ecdit_expert_vtable *const *experts;
} ecdit_plugin;

typedef const ecdit_plugin *(*ecdit_entry_fn)(const ecdit_host *host);

/* Makes an instance from the complete parameter object (JSON text of len bytes,
 * defaults filled in by the host). ctx is the table's ctx. */
typedef int32_t (*ecdit_create_fn)(const void *ctx, const char *params_json, size_t len, void **out, ecdit_err *err);
typedef void (*ecdit_destroy_fn)(void *handle);

/* ---- routers: host code over host buffers ---- */

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

/* The fields up to backward are version 1's router table. */
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
    /* Optional ("router-hints"): 1 when a sample's routing can depend on other
     * samples of its batch. Default: 1. */
    uint32_t (*couples_samples)(void *handle);
    /* Optional ("router-hints"): can batches of tokens_per_sample tokens be
     * routed? Default: yes. */
    int32_t (*check_tokens_per_sample)(void *handle, size_t tokens_per_sample, ecdit_err *err);
} ecdit_router_vtable;

/* ---- schedulers: host code over host buffers (unchanged from version 1) ---- */

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

/* ---- backends: buffers, transfers and ops over ecdit_tensor ---- */

typedef struct ecdit_gemm_dims {
    size_t m, n, k;
    uint32_t trans_a;
    uint32_t trans_b;
} ecdit_gemm_dims;

typedef struct ecdit_attn_dims {
    size_t batch, heads, kv_heads, q_len, kv_len, head_dim;
} ecdit_attn_dims;

typedef struct ecdit_mod_chunks {
    size_t chunks, first, second;
} ecdit_mod_chunks;

typedef struct ecdit_row_dims {
    size_t batch, tokens, d;
} ecdit_row_dims;

typedef struct ecdit_patch_dims {
    size_t batch, channels, height, width, patch;
    uint32_t channels_fastest;
} ecdit_patch_dims;

typedef struct ecdit_adamw {
    float lr, beta1, beta2, eps, weight_decay;
} ecdit_adamw;

typedef const ecdit_tensor *ecdit_t;

/* One slot per method of the Backend trait (engine/src/backend.rs documents
 * each op). Required: create, destroy, name, alloc, buffer_free, upload,
 * download. Every other slot is optional: NULL takes the default noted, or
 * else the op fails with "does not implement op <name>". */
typedef struct ecdit_backend_vtable {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *kind;
    const char *description;
    const char *params_json;
    const void *ctx;
    ecdit_create_fn create;
    ecdit_destroy_fn destroy; /* buffers stay valid until freed */
    const char *(*name)(void *h);
    size_t (*threads)(void *h);                   /* optional; default 1 */
    uint32_t (*supports)(void *h, uint32_t dtype); /* optional; default: f32, u32, u8 */
    /* Allocates bytes zeroed bytes; *out is the buffer handle. */
    int32_t (*alloc)(void *h, size_t bytes, void **out, ecdit_err *err);
    /* May run after destroy. On the lent backend it frees only a buffer that
     * backend allocated and nobody freed or pushed; a freed handle is dead. */
    void (*buffer_free)(void *buffer);
    /* Optional: the base address when the buffer is host memory the host may
     * read and write directly (stable, aligned to 64 bytes; an address not
     * aligned to 64 is taken as NULL). Default: NULL, not host memory. */
    void *(*buffer_host_ptr)(void *buffer);
    /* len is the view's byte length (the host checks it before calling). */
    int32_t (*upload)(void *h, ecdit_t dst, const void *src, size_t len, ecdit_err *err);
    int32_t (*download)(void *h, void *dst, size_t len, ecdit_t src, ecdit_err *err);
    int32_t (*copy)(void *h, ecdit_t dst, ecdit_t src, ecdit_err *err);
    int32_t (*fill)(void *h, ecdit_t dst, float value, ecdit_err *err);
    int32_t (*gemm)(void *h, ecdit_t out, ecdit_t a, ecdit_t b, ecdit_t bias, ecdit_gemm_dims dims, float alpha,
                    float beta, ecdit_err *err);
    int32_t (*gemm_batched)(void *h, ecdit_t out, ecdit_t a, ecdit_t b, size_t batch, ecdit_gemm_dims dims,
                            float alpha, float beta, ecdit_err *err);
    /* Optional; default: one gemm per non-empty group. */
    int32_t (*gemm_grouped)(void *h, ecdit_t out, ecdit_t a, ecdit_t b, const size_t *group_rows, size_t groups,
                            size_t n, size_t k, uint32_t trans_b, float alpha, float beta, ecdit_err *err);
    int32_t (*add_broadcast)(void *h, ecdit_t out, ecdit_t inp, ecdit_err *err);
    int32_t (*axpby)(void *h, ecdit_t y, float a, ecdit_t x, float b, ecdit_err *err);
    int32_t (*sum_rows)(void *h, ecdit_t out, ecdit_t inp, size_t rows, size_t cols, uint32_t accumulate,
                        ecdit_err *err);
    int32_t (*softmax_rows)(void *h, ecdit_t out, ecdit_t inp, size_t rows, size_t cols, ecdit_err *err);
    int32_t (*softmax_rows_backward)(void *h, ecdit_t dinp, ecdit_t dout, ecdit_t out, size_t rows, size_t cols,
                                     ecdit_err *err);
    int32_t (*layer_norm)(void *h, ecdit_t out, ecdit_t mean, ecdit_t rstd, ecdit_t inp, ecdit_t weight,
                          ecdit_t bias, size_t rows, size_t cols, float eps, ecdit_err *err);
    int32_t (*layer_norm_backward)(void *h, ecdit_t dinp, ecdit_t dweight, ecdit_t dbias, ecdit_t dout,
                                   ecdit_t inp, ecdit_t mean, ecdit_t rstd, ecdit_t weight, size_t rows,
                                   size_t cols, ecdit_err *err);
    int32_t (*unary)(void *h, uint32_t op, ecdit_t out, ecdit_t inp, ecdit_err *err);
    int32_t (*unary_backward)(void *h, uint32_t op, ecdit_t dinp, ecdit_t dout, ecdit_t inp, ecdit_err *err);
    int32_t (*modulate)(void *h, ecdit_t out, ecdit_t inp, ecdit_t modulation, ecdit_mod_chunks which,
                        ecdit_row_dims dims, ecdit_err *err);
    int32_t (*modulate_backward)(void *h, ecdit_t dinp, ecdit_t dmodulation, ecdit_t dout, ecdit_t inp,
                                 ecdit_t modulation, ecdit_mod_chunks which, ecdit_row_dims dims, ecdit_err *err);
    int32_t (*gated_residual)(void *h, ecdit_t x, ecdit_t y, ecdit_t modulation, ecdit_mod_chunks which,
                              ecdit_row_dims dims, ecdit_err *err);
    int32_t (*gated_residual_backward)(void *h, ecdit_t dy, ecdit_t dmodulation, ecdit_t dx, ecdit_t y,
                                       ecdit_t modulation, ecdit_mod_chunks which, ecdit_row_dims dims,
                                       ecdit_err *err);
    int32_t (*patchify)(void *h, ecdit_t out, ecdit_t inp, ecdit_patch_dims dims, ecdit_err *err);
    int32_t (*unpatchify)(void *h, ecdit_t out, ecdit_t inp, ecdit_patch_dims dims, ecdit_err *err);
    int32_t (*timestep_features)(void *h, ecdit_t out, ecdit_t t, size_t dim, float max_period, ecdit_err *err);
    /* probs NULL: inference (keep no probabilities); key_mask NULL: absent. */
    int32_t (*attention)(void *h, ecdit_t out, ecdit_t probs, ecdit_t q, ecdit_t k, ecdit_t v, ecdit_t key_mask,
                         ecdit_attn_dims dims, ecdit_err *err);
    int32_t (*attention_backward)(void *h, ecdit_t dq, ecdit_t dk, ecdit_t dv, ecdit_t dout, ecdit_t probs,
                                  ecdit_t q, ecdit_t k, ecdit_t v, ecdit_attn_dims dims, ecdit_err *err);
    int32_t (*gather_rows)(void *h, ecdit_t out, ecdit_t inp, ecdit_t idx, size_t cols, ecdit_err *err);
    int32_t (*scatter_add_rows)(void *h, ecdit_t out, ecdit_t inp, ecdit_t idx, ecdit_t scale, size_t cols,
                                ecdit_err *err);
    int32_t (*gather_dot)(void *h, ecdit_t out, ecdit_t a, ecdit_t idx, ecdit_t b, size_t cols, ecdit_err *err);
    int32_t (*top_k_rows)(void *h, ecdit_t idx, ecdit_t val, ecdit_t inp, size_t rows, size_t cols, size_t k,
                          ecdit_err *err);
    int32_t (*router_softmax)(void *h, ecdit_t out, ecdit_t scores, size_t rows, size_t experts, ecdit_err *err);
    int32_t (*top_k_tokens)(void *h, ecdit_t idx, ecdit_t val, ecdit_t probs, size_t groups, size_t group_rows,
                            size_t experts, size_t k, ecdit_err *err);
    int32_t (*adamw_step)(void *h, ecdit_t param, ecdit_t grad, ecdit_t m, ecdit_t v, ecdit_adamw hp,
                          uint64_t step, ecdit_err *err);
    /* Optional: the host is about to write the buffer's memory through its
     * host pointer (a zero-copy view), not through an op; a backend keeping
     * data derived from the contents (pre-packed weights) forgets it.
     * Default: nothing. */
    void (*buffer_written)(void *buffer);
} ecdit_backend_vtable;

/* ---- experts: compute through the backend the host lends for each call ---- */

/* The host's backend for one call (create and destroy of its table are NULL). */
typedef struct ecdit_backend_ref {
    const ecdit_backend_vtable *vtable;
    void *handle;
} ecdit_backend_ref;

/* Where forward hands the tensors it caches: push gives the host a buffer the
 * expert allocated through the lent backend during this call (offset 0, not
 * freed, not pushed before); the host owns it from then on. push is valid only
 * during the forward call that received the sink (from any thread); never
 * keep the sink past it. */
typedef struct ecdit_tensor_sink {
    void *ctx;
    int32_t (*push)(void *ctx, ecdit_t tensor, ecdit_err *err);
} ecdit_tensor_sink;

/* Every slot required. */
typedef struct ecdit_expert_vtable {
    uint32_t abi_version;
    uint32_t struct_size;
    const char *kind;
    const char *description;
    const char *params_json;
    const void *ctx;
    ecdit_create_fn create;
    ecdit_destroy_fn destroy;
    size_t (*hidden)(void *h, size_t d);
    double (*flops_per_token)(void *h, size_t d);
    /* JSON array of {"name", "shape", "layout", "init"}: layout "as_stored",
     * "input_major" or {"input_major_chunks": k}; init "zeros", "ones", "fixed",
     * {"normal": std} or {"xavier_uniform": [fan_in, fan_out]}. Writes at most
     * cap bytes (no NUL) and the full length to *len; the host calls again with a
     * larger buffer when *len > cap (at most 16 MiB; longer is an error). */
    int32_t (*param_shapes)(void *h, size_t d, size_t experts, char *out, size_t cap, size_t *len, ecdit_err *err);
    /* cache NULL: inference, keep nothing. offsets: n_offsets = E + 1 row offsets. */
    int32_t (*forward)(void *h, const ecdit_backend_ref *backend, ecdit_t out, const ecdit_tensor_sink *cache,
                       ecdit_t x, const ecdit_tensor *params, size_t n_params, const size_t *offsets,
                       size_t n_offsets, size_t d, ecdit_err *err);
    /* Overwrites dx, accumulates into dparams; cache: what forward pushed, in order. */
    int32_t (*backward)(void *h, const ecdit_backend_ref *backend, ecdit_t dx, const ecdit_tensor *dparams,
                        size_t n_dparams, ecdit_t dout, const ecdit_tensor *cache, size_t n_cache, ecdit_t x,
                        const ecdit_tensor *params, size_t n_params, const size_t *offsets, size_t n_offsets,
                        size_t d, ecdit_err *err);
} ecdit_expert_vtable;

#ifdef __cplusplus
}
#endif

#endif /* ECDIT_PLUGIN_H */
