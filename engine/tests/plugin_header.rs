//! The C headers and the Rust mirrors agree: a C program compiled against
//! `ecdit_plugin.h` (ABI 2) or the frozen `ecdit_plugin_v1.h` prints the size
//! of every struct and the offset of every field, and each must equal
//! `size_of` / `offset_of!` in Rust.

mod common;

use ecdit_engine::plugin::{abi::*, abi_v1::*};
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

/// (C struct, Rust size, [(field, Rust offset)]).
type Layout = Vec<(&'static str, usize, Vec<(&'static str, usize)>)>;

macro_rules! layouts {
    ($($c:literal => $r:ty { $($f:ident),* $(,)? }),* $(,)?) => {
        vec![$(($c, size_of::<$r>(), vec![$((stringify!($f), offset_of!($r, $f))),*])),*]
    };
}

/// The structs both versions share, unchanged.
fn shared() -> Layout {
    layouts! {
        "ecdit_err" => ErrBuf { msg, cap },
        "ecdit_f32s" => F32s { ptr, len },
        "ecdit_f32s_mut" => F32sMut { ptr, len },
        "ecdit_u32s" => U32s { ptr, len },
        "ecdit_u32s_mut" => U32sMut { ptr, len },
        "ecdit_u8s" => U8s { ptr, len },
        "ecdit_routing_view" => RoutingView {
            experts, tokens_total, offsets, tokens, gates, slots, probs, probs_len, has_aux, aux_loss, group_size
        },
        "ecdit_rng" => Rng { ctx, next_u32, next_u64, fill_bytes },
        "ecdit_gemm_dims" => GemmDimsC { m, n, k, trans_a, trans_b },
        "ecdit_attn_dims" => AttnDimsC { batch, heads, kv_heads, q_len, kv_len, head_dim },
        "ecdit_adamw" => AdamWC { lr, beta1, beta2, eps, weight_decay },
    }
}

fn v2() -> Layout {
    let mut l = shared();
    l.extend(layouts! {
        "ecdit_host" => Host { abi_version, struct_size, log, max_level, features },
        "ecdit_tensor" => TensorDesc { buffer, offset, dtype, rank, dims },
        "ecdit_plugin" => PluginDesc {
            abi_version, struct_size, name, version, n_routers, routers, n_schedulers, schedulers, n_backends, backends,
            features, n_experts, experts
        },
        "ecdit_router_vtable" => RouterVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, route, free_result, backward,
            couples_samples, check_tokens_per_sample
        },
        "ecdit_scheduler_vtable" => SchedulerVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, draw_t, add_noise, target,
            model_time, sampling_times, step
        },
        "ecdit_mod_chunks" => ModChunksC { chunks, first, second },
        "ecdit_row_dims" => RowDimsC { batch, tokens, d },
        "ecdit_patch_dims" => PatchDimsC { batch, channels, height, width, patch, channels_fastest },
        "ecdit_backend_vtable" => BackendVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, name, threads, supports,
            alloc, buffer_free, buffer_host_ptr, upload, download, copy, fill, gemm, gemm_batched, gemm_grouped,
            add_broadcast, axpby, sum_rows, softmax_rows, softmax_rows_backward, layer_norm, layer_norm_backward,
            unary, unary_backward, modulate, modulate_backward, gated_residual, gated_residual_backward, patchify,
            unpatchify, timestep_features, attention, attention_backward, gather_rows, scatter_add_rows, gather_dot,
            top_k_rows, router_softmax, top_k_tokens, adamw_step, buffer_written
        },
        "ecdit_backend_ref" => BackendRef { vtable, handle },
        "ecdit_tensor_sink" => TensorSink { ctx, push },
        "ecdit_expert_vtable" => ExpertVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, hidden, flops_per_token,
            param_shapes, forward, backward
        },
    });
    l
}

fn v1() -> Layout {
    let mut l = shared();
    l.extend(layouts! {
        "ecdit_host" => HostV1 { abi_version, struct_size, log, max_level },
        "ecdit_plugin" => PluginDescV1 {
            abi_version, struct_size, name, version, n_routers, routers, n_schedulers, schedulers, n_backends, backends
        },
        "ecdit_router_vtable" => RouterVtableV1 {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, route, free_result, backward
        },
        "ecdit_scheduler_vtable" => SchedulerVtableV1 {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, draw_t, add_noise, target,
            model_time, sampling_times, step
        },
        "ecdit_backend_vtable" => BackendVtableV1 {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, name, threads, gemm,
            gemm_batched, add_bias, sum_rows, softmax_rows, softmax_rows_backward, layer_norm, layer_norm_backward,
            unary, unary_backward, attention, attention_backward, gather_rows, scatter_add_rows, top_k_rows, adamw_step
        },
    });
    l
}

/// Compiles and runs the layout program for `header`; returns the C values.
fn c_values(header: &str, layouts: &Layout) -> BTreeMap<String, usize> {
    let mut c = format!("#include <stdio.h>\n#include <stddef.h>\n#include \"{header}\"\nint main(void) {{\n");
    c.push_str("    printf(\"ECDIT_ABI_VERSION %u\\n\", ECDIT_ABI_VERSION);\n");
    for (s, _, fields) in layouts {
        c.push_str(&format!("    printf(\"{s} %zu\\n\", sizeof({s}));\n"));
        for (f, _) in fields {
            c.push_str(&format!("    printf(\"{s}.{f} %zu\\n\", offsetof({s}, {f}));\n"));
        }
    }
    c.push_str("    return 0;\n}\n");
    let dir = common::scratch();
    let stem = header.trim_end_matches(".h");
    let src = dir.join(format!("layout-{stem}.c"));
    let exe = dir.join(format!("layout-{stem}-{}", std::process::id()));
    std::fs::write(&src, c).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-I")
        .arg(common::engine_dir().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "{cc} failed on the layout program for {header}");
    let out = Command::new(&exe).output().expect("run the layout program");
    let _ = std::fs::remove_file(&exe);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn compare(header: &str, version: u32, layouts: Layout) -> usize {
    let c = c_values(header, &layouts);
    assert_eq!(c["ECDIT_ABI_VERSION"], version as usize, "{header}");
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (s, size, fields) in &layouts {
        if c[*s] != *size {
            mismatches.push(format!("sizeof({s}): C {} Rust {size}", c[*s]));
        }
        for (f, off) in fields {
            let key = format!("{s}.{f}");
            if c[&key] != *off {
                mismatches.push(format!("offsetof({key}): C {} Rust {off}", c[&key]));
            }
            checked += 1;
        }
    }
    assert!(
        mismatches.is_empty(),
        "{header} and Rust disagree:\n{}",
        mismatches.join("\n")
    );
    checked
}

#[test]
fn the_v2_header_and_rust_agree_on_every_size_and_offset() {
    let checked = compare("ecdit_plugin.h", ABI_VERSION, v2());
    assert!(checked > 130, "only {checked} fields compared");
}

#[test]
fn the_frozen_v1_header_and_rust_agree_on_every_size_and_offset() {
    let checked = compare("ecdit_plugin_v1.h", ABI_VERSION_V1, v1());
    assert!(checked > 80, "only {checked} fields compared");
}

#[test]
fn v1_router_and_scheduler_tables_are_prefixes_of_v2() {
    // The v1 reader relies on nothing but this being true for what it converts.
    assert_eq!(offset_of!(RouterVtable, couples_samples), size_of::<RouterVtableV1>());
    assert_eq!(size_of::<SchedulerVtable>(), size_of::<SchedulerVtableV1>());
    assert_eq!(offset_of!(PluginDesc, features), size_of::<PluginDescV1>());
    assert_eq!(offset_of!(Host, features), size_of::<HostV1>());
}
