//! `step_on` (one backend `axpby`) against the host `step`, to the bit, on the
//! CPU backend; and its argument errors.

use ecdit_engine::{Backend, BackendExt, DType, Registry, Scheduler};
use ecdit_schedulers::{Ddpm, RectifiedFlow, TimestepSpacing};
use proptest::prelude::*;
use serde_json::json;

fn cpu() -> Box<dyn Backend> {
    let mut reg = Registry::new();
    ecdit_backend_cpu::register(&mut reg).unwrap();
    reg.backend(&json!("cpu")).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One step both ways; returns (host, backend) results.
fn both(
    sched: &dyn Scheduler,
    backend: &dyn Backend,
    x: &[f32],
    out: &[f32],
    t: f32,
    t_next: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut host = x.to_vec();
    sched.step(&mut host, out, t, t_next).unwrap();
    let mut xd = backend.upload_f32(&[x.len()], x, DType::F32).unwrap();
    let od = backend.upload_f32(&[out.len()], out, DType::F32).unwrap();
    sched.step_on(backend, xd.view_mut(), od.view(), t, t_next).unwrap();
    (host, backend.read_f32(xd.view()).unwrap())
}

fn vec_pair(max_len: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (1..max_len).prop_flat_map(|n| {
        (
            prop::collection::vec(-4.0f32..4.0, n),
            prop::collection::vec(-4.0f32..4.0, n),
        )
    })
}

proptest! {
    #[test]
    fn flow_step_on_is_the_host_step_to_the_bit(
        (x, v) in vec_pair(300),
        t in 0.0f32..=1.0,
        t_next in 0.0f32..=1.0,
        shift in 0.1f64..10.0,
    ) {
        let backend = cpu();
        let flow = RectifiedFlow::new(0.0, 1.0, shift, 1000.0).unwrap();
        let (host, dev) = both(&flow, backend.as_ref(), &x, &v, t, t_next);
        prop_assert_eq!(bits(&host), bits(&dev));
    }

    #[test]
    fn ddim_step_on_is_the_host_step_to_the_bit(
        (x, eps) in vec_pair(300),
        t in 0usize..1000,
        back in 1usize..1001,
    ) {
        let backend = cpu();
        let ddpm = Ddpm::default();
        // t_next below t, or -1 (the final step to data).
        let t_next = t as f32 - back as f32;
        let t_next = if t_next < 0.0 { -1.0 } else { t_next };
        let (host, dev) = both(&ddpm, backend.as_ref(), &x, &eps, t as f32, t_next);
        prop_assert_eq!(bits(&host), bits(&dev));
    }

    #[test]
    fn whole_sampling_runs_agree_to_the_bit(
        (x0, eps) in vec_pair(64),
        steps in 1usize..60,
        spacing in prop_oneof![Just(TimestepSpacing::Leading), Just(TimestepSpacing::Trailing)],
    ) {
        let backend = cpu();
        let ddpm = Ddpm::new(1000, 1e-4, 0.02, spacing).unwrap();
        let flow = RectifiedFlow::new(0.0, 1.0, 3.0, 1000.0).unwrap();
        for sched in [&ddpm as &dyn Scheduler, &flow] {
            let times = sched.sampling_times(steps).unwrap();
            let mut host = x0.clone();
            let mut dev = backend.upload_f32(&[x0.len()], &x0, DType::F32).unwrap();
            let out = backend.upload_f32(&[eps.len()], &eps, DType::F32).unwrap();
            for w in times.windows(2) {
                sched.step(&mut host, &eps, w[0], w[1]).unwrap();
                sched.step_on(backend.as_ref(), dev.view_mut(), out.view(), w[0], w[1]).unwrap();
            }
            prop_assert_eq!(bits(&host), bits(&backend.read_f32(dev.view()).unwrap()), "{}", sched.kind());
        }
    }
}

#[test]
fn step_on_errors_name_what_is_wrong() {
    let backend = cpu();
    let b = backend.as_ref();
    let mut x = b.zeros(&[4], DType::F32).unwrap();
    let short = b.zeros(&[3], DType::F32).unwrap();
    let idx = b.zeros(&[4], DType::U32).unwrap();
    let out = b.zeros(&[4], DType::F32).unwrap();
    let flow = RectifiedFlow::default();
    let ddpm = Ddpm::default();

    let e = flow
        .step_on(b, x.view_mut(), short.view(), 1.0, 0.5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("velocity") && e.contains("4 elements") && e.contains("3 elements"),
        "{e}"
    );
    let e = ddpm
        .step_on(b, x.view_mut(), short.view(), 10.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("epsilon") && e.contains("3 elements"), "{e}");
    let e = ddpm
        .step_on(b, x.view_mut(), idx.view(), 10.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("epsilon") && e.contains("u32") && e.contains("f32 or bf16"),
        "{e}"
    );

    let e = flow
        .step_on(b, x.view_mut(), out.view(), 1.0, -0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("step_on") && e.contains("t_next = -0.5"), "{e}");
    let e = flow
        .step_on(b, x.view_mut(), out.view(), f32::NAN, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t = NaN"), "{e}");
    let e = ddpm
        .step_on(b, x.view_mut(), out.view(), 1000.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("step_on") && e.contains("t = 1000") && e.contains("0..=999"),
        "{e}"
    );
    let e = ddpm
        .step_on(b, x.view_mut(), out.view(), 10.0, 3.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t_next = 3.5"), "{e}");
    // Nothing was written by the refused steps.
    assert_eq!(b.read_f32(x.view()).unwrap(), vec![0.0; 4]);
}

#[test]
fn step_on_takes_one_sample_of_a_batch_as_a_view() {
    // A learned-sigma output [B, 2C, H, W]: sample 1's epsilon half is one
    // contiguous view, the same bits as the host step on that slice.
    let backend = cpu();
    let b = backend.as_ref();
    let (batch, c, hw) = (3, 2, 4);
    let out_host: Vec<f32> = (0..batch * 2 * c * hw).map(|i| (i as f32 * 0.37).sin()).collect();
    let x_host: Vec<f32> = (0..batch * c * hw).map(|i| (i as f32 * 0.11).cos()).collect();
    let out = b.upload_f32(&[batch, 2 * c, hw], &out_host, DType::F32).unwrap();
    let mut x = b.upload_f32(&[batch, c, hw], &x_host, DType::F32).unwrap();
    let ddpm = Ddpm::default();
    let eps1 = out.view().rows(1, 1).unwrap().flat(0, c * hw).unwrap();
    let x1 = x.view_mut().rows(1, 1).unwrap().flat(0, c * hw).unwrap();
    ddpm.step_on(b, x1, eps1, 500.0, 480.0).unwrap();
    let mut want = x_host.clone();
    let eps_host = &out_host[2 * c * hw..2 * c * hw + c * hw];
    ddpm.step(&mut want[c * hw..2 * c * hw], eps_host, 500.0, 480.0)
        .unwrap();
    assert_eq!(bits(&b.read_f32(x.view()).unwrap()), bits(&want));
}
