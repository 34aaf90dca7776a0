/*
 * c-hash: a router in plain C against ecdit_plugin.h (ABI 2). The same file
 * against the frozen ecdit_plugin_v1.h is engine/tests/fixtures/v1_hash_router.c;
 * both load into an ABI 2 host and route identically. The optional ABI 2
 * router slots (couples_samples, check_tokens_per_sample) are left NULL, so
 * their defaults apply: the hash reads global row indices, so a sample's
 * routing does depend on its batch.
 *
 * Token t goes to exactly one expert, chosen by hashing its row index with a
 * seed (balanced in expectation, blind to the scores); its gate is the router
 * probability softmax(scores[t])[e], so the router still learns through the
 * gates. Build: cc -shared -fPIC -O2 -I engine/include c_hash_router.c -o libc_hash_router.so
 */
#include "ecdit_plugin.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t seed; } c_hash;

typedef struct {
    size_t *offsets;
    uint32_t *tokens;
    float *gates;
    float *probs;
} c_hash_result;

static ecdit_log_fn host_log;

static int32_t fail(ecdit_err *err, const char *msg) {
    if (err && err->msg && err->cap) snprintf(err->msg, err->cap, "%s", msg);
    return ECDIT_ERROR;
}

static size_t pick(const c_hash *r, size_t t, size_t experts) {
    uint64_t x = (uint64_t)t * 0x9E3779B97F4A7C15ull ^ r->seed;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
    return (size_t)(x % experts);
}

static int32_t create(const void *ctx, const char *json, size_t len, void **out, ecdit_err *err) {
    (void)ctx;
    c_hash *r = calloc(1, sizeof *r);
    if (!r) return fail(err, "out of memory");
    /* The host hands the complete parameter object, e.g. {"seed":7}. */
    char buf[256];
    size_t n = len < sizeof buf - 1 ? len : sizeof buf - 1;
    memcpy(buf, json, n);
    buf[n] = 0;
    const char *s = strstr(buf, "\"seed\":");
    if (s) r->seed = strtoull(s + 7, NULL, 10);
    *out = r;
    return ECDIT_OK;
}

static void destroy(void *h) { free(h); }

static void free_result(void *p) {
    c_hash_result *res = p;
    if (!res) return;
    free(res->offsets); free(res->tokens); free(res->gates); free(res->probs); free(res);
}

static int32_t route(void *h, ecdit_routing_view *view, void **out_result, ecdit_f32s scores, size_t samples,
                     size_t tokens_per_sample, size_t experts, ecdit_err *err) {
    const c_hash *r = h;
    size_t tokens = samples * tokens_per_sample;
    if (experts == 0) return fail(err, "c-hash needs at least one expert");
    if (scores.len != tokens * experts) return fail(err, "scores length is not tokens * experts");
    c_hash_result *res = calloc(1, sizeof *res);
    if (!res) return fail(err, "out of memory");
    res->offsets = calloc(experts + 1, sizeof(size_t));
    res->tokens = malloc((tokens ? tokens : 1) * sizeof(uint32_t));
    res->gates = malloc((tokens ? tokens : 1) * sizeof(float));
    res->probs = malloc((tokens > 0 ? tokens * experts : 1) * sizeof(float));
    if (!res->offsets || !res->tokens || !res->gates || !res->probs) { free_result(res); return fail(err, "out of memory"); }
    for (size_t t = 0; t < tokens; t++) { /* softmax rows */
        const float *row = scores.ptr + t * experts;
        float *p = res->probs + t * experts;
        float mx = row[0];
        for (size_t e = 0; e < experts; e++) {
            if (!isfinite(row[e])) { free_result(res); return fail(err, "non-finite score"); }
            if (row[e] > mx) mx = row[e];
        }
        float sum = 0.0f;
        for (size_t e = 0; e < experts; e++) { p[e] = expf(row[e] - mx); sum += p[e]; }
        for (size_t e = 0; e < experts; e++) p[e] /= sum;
        res->offsets[pick(r, t, experts) + 1]++;
    }
    for (size_t e = 0; e < experts; e++) res->offsets[e + 1] += res->offsets[e];
    size_t *fill = calloc(experts, sizeof(size_t));
    if (!fill) { free_result(res); return fail(err, "out of memory"); }
    for (size_t t = 0; t < tokens; t++) { /* expert-major, tokens ascending */
        size_t e = pick(r, t, experts);
        size_t s = res->offsets[e] + fill[e]++;
        res->tokens[s] = (uint32_t)t;
        res->gates[s] = res->probs[t * experts + e];
    }
    free(fill);
    if (host_log) host_log(ECDIT_LOG_TRACE, "c_hash_router", "routed a batch");
    view->experts = experts;
    view->tokens_total = tokens;
    view->offsets = res->offsets;
    view->tokens = res->tokens;
    view->gates = res->gates;
    view->slots = tokens;
    view->probs = res->probs;
    view->probs_len = tokens * experts;
    view->has_aux = 0;
    view->aux_loss = 0.0f;
    view->group_size = tokens_per_sample;
    *out_result = res;
    return ECDIT_OK;
}

/* gate = p_e with p = softmax(row): d gate / d s_j = p_e (delta_ej - p_j). */
static int32_t backward(void *h, ecdit_f32s_mut grad_scores, const ecdit_routing_view *rv, ecdit_f32s scores,
                        ecdit_f32s grad_gates, float grad_aux, ecdit_err *err) {
    (void)h; (void)scores; (void)grad_aux;
    size_t experts = rv->experts;
    if (grad_scores.len != rv->tokens_total * experts || rv->probs_len != grad_scores.len)
        return fail(err, "grad_scores length is not tokens * experts");
    if (grad_gates.len != rv->slots) return fail(err, "grad_gates length is not the slot count");
    memset(grad_scores.ptr, 0, grad_scores.len * sizeof(float));
    for (size_t e = 0; e < experts; e++) {
        for (size_t s = rv->offsets[e]; s < rv->offsets[e + 1]; s++) {
            size_t t = rv->tokens[s];
            const float *p = rv->probs + t * experts;
            float *g = grad_scores.ptr + t * experts;
            float gg = grad_gates.ptr[s] * p[e];
            for (size_t j = 0; j < experts; j++) g[j] += gg * ((j == e ? 1.0f : 0.0f) - p[j]);
        }
    }
    return ECDIT_OK;
}

static const ecdit_router_vtable c_hash_vtable = {
    .abi_version = ECDIT_ABI_VERSION,
    .struct_size = sizeof(ecdit_router_vtable),
    .kind = "c-hash",
    .description = "Hash routing written in C: one expert per token by row hash, gate = router probability",
    .params_json = "[{\"name\": \"seed\", \"type\": \"int\", \"default\": 0, \"help\": \"hash seed\"}]",
    .ctx = NULL,
    .create = create,
    .destroy = destroy,
    .route = route,
    .free_result = free_result,
    .backward = backward,
};

static const ecdit_router_vtable *const routers[] = {&c_hash_vtable};

static const ecdit_plugin plugin = {
    .abi_version = ECDIT_ABI_VERSION,
    .struct_size = sizeof(ecdit_plugin),
    .name = "c-hash-router",
    .version = "0.1.0",
    .n_routers = 1,
    .routers = routers,
};

ECDIT_EXPORT const ecdit_plugin *ecdit_plugin_entry(const ecdit_host *host) {
    if (host && host->struct_size >= sizeof(ecdit_host)) host_log = host->log;
    if (host_log) host_log(ECDIT_LOG_INFO, "c_hash_router", "c-hash router loaded");
    return &plugin;
}
