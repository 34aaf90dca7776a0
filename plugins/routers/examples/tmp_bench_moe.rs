// TEMPORARY (moe helper): runs ecdit-model's bench_moe while ecdit-model does not compile. Delete me.
#[path = "../../../ecdit-model/src/bench_moe.rs"]
#[allow(dead_code)]
mod bench_moe;
fn main() {
    if std::env::var("CPU").is_ok() { cpu_mode(std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1), std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(10)); return; }
    if std::env::var("MOEPARTS").is_ok() {
        moe_parts(2);
        return;
    }
    if std::env::var("PARTS").is_ok() {
        parts(std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2));
        return;
    }
    let mut registry = ecdit_engine::Registry::new();
    ecdit_routers::register(&mut registry).unwrap();
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let reps: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let backend = ecdit_backend_cpu::CpuBackend::new(threads).unwrap();
    for r in bench_moe::bench_moe(&registry, &backend, &bench_moe::default_routers(), reps).unwrap() {
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
#[allow(dead_code)]
pub fn parts(threads: usize) {
    use ecdit_engine::{Backend, GemmDims, Unary};
    use std::time::Instant;
    let be = ecdit_backend_cpu::CpuBackend::new(threads).unwrap();
    let (t, h, d) = (2048usize, 3072usize, 384usize);
    let x = vec![0.5f32; t * d];
    let w1 = vec![0.01f32; h * d];
    let mut pre = vec![0.0f32; t * h];
    let mut act = vec![0.0f32; t * h];
    let b1 = vec![0.1f32; h];
    let time = |name: &str, f: &mut dyn FnMut()| {
        f();
        let mut v = vec![];
        for _ in 0..7 {
            let s = Instant::now();
            f();
            v.push(s.elapsed().as_secs_f64() * 1e3);
        }
        v.sort_by(f64::total_cmp);
        println!("{name}: {:.2} ms", v[3]);
    };
    time("gemm nt 2048x3072x384", &mut || {
        be.gemm(&mut pre, &x, &w1, GemmDims::nt(t, h, d), 1.0, 0.0).unwrap()
    });
    time("gemm nn 2048x3072x384", &mut || {
        be.gemm(&mut pre, &x, &w1, GemmDims::nn(t, h, d), 1.0, 0.0).unwrap()
    });
    time("add_bias 2048x3072", &mut || be.add_bias(&mut pre, &b1, t, h).unwrap());
    time("gelu 2048x3072", &mut || {
        be.unary(Unary::GeluTanh, &mut act, &pre).unwrap()
    });
    let mut out = vec![0.0f32; t * d];
    time("gemm nt 2048x384x3072", &mut || {
        be.gemm(&mut out, &act, &w1, GemmDims::nt(t, d, h), 1.0, 0.0).unwrap()
    });
    let idx: Vec<u32> = (0..2 * t as u32).map(|i| (i * 7919) % t as u32).collect();
    let mut xs = vec![0.0f32; 2 * t * d];
    time("gather 4096 rows", &mut || {
        be.gather_rows(&mut xs, &x, &idx, d).unwrap()
    });
    let g = vec![0.3f32; 2 * t];
    time("scatter 4096 rows", &mut || {
        be.scatter_add_rows(&mut out, &xs, &idx, Some(&g), d).unwrap()
    });
}
#[allow(dead_code)]
pub fn moe_parts(threads: usize) {
    use ecdit_engine::{Backend, Expert, ExpertCache, GemmDims, RouteShape};
    use ecdit_routers::experts::GeluMlp;
    use std::time::Instant;
    let be = ecdit_backend_cpu::CpuBackend::new(threads).unwrap();
    let mut registry = ecdit_engine::Registry::new();
    ecdit_routers::register(&mut registry).unwrap();
    let (t, d, e) = (2048usize, 384usize, 8usize);
    let x: Vec<f32> = (0..t * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let time = |name: &str, f: &mut dyn FnMut()| {
        f();
        let mut v = vec![];
        for _ in 0..9 {
            let s = Instant::now();
            f();
            v.push(s.elapsed().as_secs_f64() * 1e3);
        }
        v.sort_by(f64::total_cmp);
        println!("{name}: {:.2} ms", v[4]);
    };
    let mk = |ratio: f64, experts: usize| -> Vec<Vec<f32>> {
        GeluMlp::new(ratio)
            .unwrap()
            .param_shapes(d, experts)
            .iter()
            .map(|p| vec![0.01f32; p.shape.iter().product()])
            .collect()
    };
    let p8 = mk(8.0, 1);
    let p4 = mk(4.0, e);
    let dense = GeluMlp::new(8.0).unwrap();
    let moe = GeluMlp::new(4.0).unwrap();
    let mut out = vec![0.0f32; t * d];
    let mut out2 = vec![0.0f32; 2 * t * d];
    let mut c1 = ExpertCache::default();
    let mut c2 = ExpertCache::default();
    let xs: Vec<f32> = (0..2 * t * d)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let s8: Vec<&[f32]> = p8.iter().map(|p| p.as_slice()).collect();
    let s4: Vec<&[f32]> = p4.iter().map(|p| p.as_slice()).collect();
    let offs: Vec<usize> = (0..=e).map(|i| i * 2 * t / e).collect();
    for _ in 0..2 {
        time("dense expert fwd (2048 rows, h=3072)", &mut || {
            dense.forward(&be, &mut out, &mut c1, &x, &s8, &[0, t], d).unwrap()
        });
        time("8 experts fwd (8x512 rows, h=1536)", &mut || {
            moe.forward(&be, &mut out2, &mut c2, &xs, &s4, &offs, d).unwrap()
        });
    }
    let wr = vec![0.01f32; d * e];
    let mut scores = vec![0.0f32; t * e];
    time("router gemm", &mut || {
        be.gemm(&mut scores, &x, &wr, GemmDims::nn(t, e, d), 1.0, 0.0).unwrap()
    });
    let scores: Vec<f32> = (0..t * e).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let shape = RouteShape {
        samples: 8,
        tokens_per_sample: 256,
        experts: e,
    };
    for spec in bench_moe::default_routers().iter().take(3) {
        let r = registry.router(spec).unwrap();
        time(&format!("route {}", r.kind()), &mut || {
            r.route(&scores, shape).unwrap();
        });
        let routing = r.route(&scores, shape).unwrap();
        time("validate", &mut || routing.dispatch.validate("x").unwrap());
    }
    let mut h1 = vec![0.0f32; t * 3072];
    let mut h2 = vec![0.0f32; 512 * 1536];
    time("gemm 2048x3072x384 nt", &mut || {
        be.gemm(&mut h1, &x, &s8[0], GemmDims::nt(t, 3072, d), 1.0, 0.0)
            .unwrap()
    });
    time("8x gemm 512x1536x384 nt", &mut || {
        for i in 0..8 {
            be.gemm(
                &mut h2,
                &xs[i * 512 * d..(i + 1) * 512 * d],
                &s4[0][i * 1536 * d..(i + 1) * 1536 * d],
                GemmDims::nt(512, 1536, d),
                1.0,
                0.0,
            )
            .unwrap()
        }
    });
    time("gemm 2048x384x3072 nt", &mut || {
        be.gemm(&mut out, &h1, &s8[2], GemmDims::nt(t, d, 3072), 1.0, 0.0)
            .unwrap()
    });
    time("8x gemm 512x384x1536 nt", &mut || {
        for i in 0..8 {
            be.gemm(
                &mut out2[..512 * d],
                &h1[..512 * 1536],
                &s4[2][i * 1536 * d..(i + 1) * 1536 * d],
                GemmDims::nt(512, d, 1536),
                1.0,
                0.0,
            )
            .unwrap()
        }
    });
}
/// CPU nanoseconds of all threads of this process (Linux schedstat), robust to preemption.
#[allow(dead_code)]
fn cpu_ns() -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = t.unwrap().path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            total += s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    total
}
#[allow(dead_code)]
pub fn cpu_mode(threads: usize, reps: usize) {
    let BOUND: f32 = std::env::var("BOUND").ok().and_then(|s| s.parse().ok()).unwrap_or(0.0559);
    use ecdit_engine::{Expert, ExpertCache, MoeCache, MoeLayer, RouteShape};
    use ecdit_routers::experts::GeluMlp;
    use rand::{Rng, SeedableRng};
    let be = ecdit_backend_cpu::CpuBackend::new(threads).unwrap();
    let mut registry = ecdit_engine::Registry::new();
    ecdit_routers::register(&mut registry).unwrap();
    let (t, d, e) = (2048usize, 384usize, 8usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..t * d).map(|_| rng.gen_range(-1.7f32..1.7)).collect();
    let dense = GeluMlp::new(8.0).unwrap();
    let dp: Vec<Vec<f32>> = dense.param_shapes(d, 1).iter().map(|p| (0..p.shape.iter().product::<usize>()).map(|_| rng.gen_range(-BOUND..BOUND)).collect()).collect();
    let ds: Vec<&[f32]> = dp.iter().map(|p| p.as_slice()).collect();
    let mut dout = vec![0.0f32; t * d];
    let mut dc = ExpertCache::default();
    for spec in bench_moe::default_routers().iter().take(3) {
        let layer = MoeLayer::new_random(registry.router(spec).unwrap(), registry.expert(&serde_json::json!("gelu-mlp")).unwrap(), d, e, &mut rng).unwrap();
        let shape = RouteShape { samples: 8, tokens_per_sample: 256, experts: e };
        let mut out = vec![0.0f32; t * d];
        let mut cache = MoeCache::default();
        let (mut m, mut n) = (vec![], vec![]);
        for i in 0..reps + 2 {
            let c0 = cpu_ns();
            layer.forward_into(&be, &mut out, &mut cache, &x, shape).unwrap();
            let c1 = cpu_ns();
            dense.forward(&be, &mut dout, &mut dc, &x, &ds, &[0, t], d).unwrap();
            let c2 = cpu_ns();
            if i >= 2 { m.push((c1 - c0) as f64 / 1e6); n.push((c2 - c1) as f64 / 1e6); }
        }
        m.sort_by(f64::total_cmp); n.sort_by(f64::total_cmp);
        let (mm, nn) = (m[m.len() / 2], n[n.len() / 2]);
        println!("{{\"router\":\"{}\",\"cpu_ms\":{:.1},\"dense_cpu_ms\":{:.1},\"ratio\":{:.3},\"threads\":{}}}", spec["kind"].as_str().unwrap(), mm, nn, mm / nn, threads);
    }
}
