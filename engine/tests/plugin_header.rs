//! The C header and the Rust mirror agree: a C program compiled against
//! `ecdit_plugin.h` prints the size of every struct and the offset of every
//! field, and each must equal `size_of` / `offset_of!` in Rust.

mod common;

use ecdit_engine::plugin::abi::*;
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

fn rust_layouts() -> Layout {
    layouts! {
        "ecdit_host" => Host { abi_version, struct_size, log, max_level },
        "ecdit_err" => ErrBuf { msg, cap },
        "ecdit_f32s" => F32s { ptr, len },
        "ecdit_f32s_mut" => F32sMut { ptr, len },
        "ecdit_u32s" => U32s { ptr, len },
        "ecdit_u32s_mut" => U32sMut { ptr, len },
        "ecdit_u8s" => U8s { ptr, len },
        "ecdit_plugin" => PluginDesc {
            abi_version, struct_size, name, version, n_routers, routers, n_schedulers, schedulers, n_backends, backends
        },
        "ecdit_routing_view" => RoutingView {
            experts, tokens_total, offsets, tokens, gates, slots, probs, probs_len, has_aux, aux_loss, group_size
        },
        "ecdit_router_vtable" => RouterVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, route, free_result, backward
        },
        "ecdit_rng" => Rng { ctx, next_u32, next_u64, fill_bytes },
        "ecdit_scheduler_vtable" => SchedulerVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, draw_t, add_noise, target,
            model_time, sampling_times, step
        },
        "ecdit_gemm_dims" => GemmDimsC { m, n, k, trans_a, trans_b },
        "ecdit_attn_dims" => AttnDimsC { batch, heads, kv_heads, q_len, kv_len, head_dim },
        "ecdit_adamw" => AdamWC { lr, beta1, beta2, eps, weight_decay },
        "ecdit_backend_vtable" => BackendVtable {
            abi_version, struct_size, kind, description, params_json, ctx, create, destroy, name, threads, gemm,
            gemm_batched, add_bias, sum_rows, softmax_rows, softmax_rows_backward, layer_norm, layer_norm_backward,
            unary, unary_backward, attention, attention_backward, gather_rows, scatter_add_rows, top_k_rows, adamw_step
        },
    }
}

#[test]
fn c_header_and_rust_agree_on_every_size_and_offset() {
    let layouts = rust_layouts();
    let mut c =
        String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"ecdit_plugin.h\"\nint main(void) {\n");
    c.push_str("    printf(\"ECDIT_ABI_VERSION %u\\n\", ECDIT_ABI_VERSION);\n");
    for (s, _, fields) in &layouts {
        c.push_str(&format!("    printf(\"{s} %zu\\n\", sizeof({s}));\n"));
        for (f, _) in fields {
            c.push_str(&format!("    printf(\"{s}.{f} %zu\\n\", offsetof({s}, {f}));\n"));
        }
    }
    c.push_str("    return 0;\n}\n");
    let dir = common::scratch();
    let src = dir.join("layout.c");
    let exe = dir.join(format!("layout-{}", std::process::id()));
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
    assert!(status.success(), "{cc} failed on the layout program");
    let out = Command::new(&exe).output().expect("run the layout program");
    let _ = std::fs::remove_file(&exe);
    let text = String::from_utf8(out.stdout).unwrap();
    let c_values: BTreeMap<&str, usize> = text
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();

    assert_eq!(c_values["ECDIT_ABI_VERSION"], ABI_VERSION as usize);
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (s, size, fields) in &layouts {
        if c_values[s] != *size {
            mismatches.push(format!("sizeof({s}): C {} Rust {size}", c_values[s]));
        }
        for (f, off) in fields {
            let key = format!("{s}.{f}");
            if c_values[key.as_str()] != *off {
                mismatches.push(format!("offsetof({key}): C {} Rust {off}", c_values[key.as_str()]));
            }
            checked += 1;
        }
    }
    assert!(
        mismatches.is_empty(),
        "header and Rust disagree:\n{}",
        mismatches.join("\n")
    );
    assert!(checked > 80, "only {checked} fields compared");
}
