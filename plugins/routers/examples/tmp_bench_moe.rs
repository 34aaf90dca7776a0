// TEMPORARY (moe helper): runs ecdit-model's bench_moe while ecdit-model does not compile. Delete me.
#[path = "../../../ecdit-model/src/bench_moe.rs"]
#[allow(dead_code)]
mod bench_moe;
fn main() {
    let mut registry = ecdit_engine::Registry::new();
    ecdit_routers::register(&mut registry).unwrap();
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let reps: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let backend = ecdit_backend_cpu::CpuBackend::new(threads).unwrap();
    for r in bench_moe::bench_moe(&registry, &backend, &bench_moe::default_routers(), reps).unwrap() {
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
