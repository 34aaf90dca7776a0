//! Times GELU forward and backward on one MLP hidden activation of DiT-S/2
//! at batch 8 (2048 x 1536 floats) and prints one JSON line per op.
//!
//! ```text
//! cargo run --release -p ecdit-backend-cpu --example unary_bench -- [threads]
//! ```

use ecdit_backend_cpu::CpuBackend;
use ecdit_engine::{Backend, BackendExt, DType, Unary};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args().nth(1).map_or(Ok(1), |t| t.parse())?;
    let be = CpuBackend::new(threads)?;
    let n = 2048 * 1536;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2000) as f32 / 250.0 - 4.0).collect();
    let x = be.upload_f32(&[n], &x, DType::F32)?;
    let (mut y, mut dx) = (be.zeros(&[n], DType::F32)?, be.zeros(&[n], DType::F32)?);
    for (name, op) in [("gelu", Unary::GeluTanh), ("silu", Unary::Silu)] {
        for backward in [false, true] {
            let mut run = || {
                if backward {
                    be.unary_backward(op, dx.view_mut(), x.view(), x.view())
                } else {
                    be.unary(op, y.view_mut(), x.view())
                }
            };
            run()?;
            let mut times: Vec<f64> = (0..15)
                .map(|_| {
                    let start = Instant::now();
                    run().map(|_| start.elapsed().as_secs_f64())
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2] * 1e3;
            println!(
                "{{\"op\":\"{name}{}\",\"n\":{n},\"threads\":{threads},\"median_ms\":{ms:.3},\"gelem_per_s\":{:.3}}}",
                if backward { "_backward" } else { "" },
                n as f64 / ms / 1e6
            );
        }
    }
    Ok(())
}
