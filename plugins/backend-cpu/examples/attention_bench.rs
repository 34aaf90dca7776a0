//! Times attention at DiT-S/2 batch 8 (256 tokens, 6 heads of 64) with
//! cached probabilities (training) and without (inference), one JSON line each.
//!
//! ```text
//! cargo run --release -p ecdit-backend-cpu --example attention_bench -- [threads]
//! ```

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{AttnDims, Backend, BackendExt, DType};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args().nth(1).map_or(Ok(1), |t| t.parse())?;
    let be = CpuBackend::new(threads)?;
    let d = AttnDims {
        batch: 8,
        heads: 6,
        kv_heads: 6,
        q_len: 256,
        kv_len: 256,
        head_dim: 64,
    };
    let n = d.batch * d.q_len * d.heads * d.head_dim;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0).collect();
    let x = be.upload_f32(&[n], &x, DType::F32)?;
    let mut out = be.zeros(&[n], DType::F32)?;
    let mut probs = be.zeros(&[d.batch * d.heads * d.q_len * d.kv_len], DType::F32)?;
    for cached in [true, false] {
        let mut run = || {
            let p = cached.then(|| probs.view_mut());
            be.attention(out.view_mut(), p, x.view(), x.view(), x.view(), None, d)
        };
        run()?;
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let start = Instant::now();
                run().map(|_| start.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        println!(
            "{{\"op\":\"attention{}\",\"threads\":{threads},\"median_ms\":{:.3}}}",
            if cached { "_with_probs" } else { "_inference" },
            times[times.len() / 2] * 1e3
        );
    }
    Ok(())
}
