//! `layer_norm_modulate`, the CPU backend's fused LayerNorm + adaLN
//! modulation: in f32 the bits of `layer_norm` then `modulate` (what the
//! trait's default runs), with or without the kept LN output; in bf16 the f32
//! result rounded once (the unfused ops round LN(x) in between).

mod common;

use common::*;
use ecdit_engine::dtype::bf16;
use ecdit_engine::{Backend, BackendExt, DType, ModChunks, RowDims, Tensor};
use proptest::prelude::*;

const EPS: f32 = 1e-6;

struct Case {
    dims: RowDims,
    which: ModChunks,
    x: Vec<f32>,
    modulation: Vec<f32>,
}

/// Values bf16 holds exactly, so both dtypes read the same inputs.
fn exact(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    randv(seed, n, scale)
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect()
}

fn case(batch: usize, tokens: usize, d: usize, chunks: usize, first: usize, second: usize, seed: u64) -> Case {
    let dims = RowDims { batch, tokens, d };
    Case {
        dims,
        which: ModChunks { chunks, first, second },
        // An offset, so the mean matters (and still exact in bf16).
        x: exact(seed, batch * tokens * d, 3.0)
            .iter()
            .map(|v| bf16::from_f32(v + 0.75).to_f32())
            .collect(),
        modulation: exact(seed + 1, batch * chunks * d, 1.0),
    }
}

fn up(dtype: DType, v: &[f32]) -> Tensor {
    cpu2().upload_f32(&[v.len()], v, dtype).unwrap()
}

fn read(t: &Tensor) -> Vec<f32> {
    cpu2().read_f32(t.view()).unwrap()
}

/// (out, ln, mean, rstd) of the fused op; `keep_ln`: ask for LN(x).
fn fused(c: &Case, dtype: DType, keep_ln: bool) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let be = cpu2();
    let (n, rows) = (c.x.len(), c.dims.batch * c.dims.tokens);
    let mut out = be.zeros(&[n], dtype).unwrap();
    let mut ln = keep_ln.then(|| be.zeros(&[n], dtype).unwrap());
    let (mut mean, mut rstd) = (
        be.zeros(&[rows], DType::F32).unwrap(),
        be.zeros(&[rows], DType::F32).unwrap(),
    );
    let (x, m) = (up(dtype, &c.x), up(dtype, &c.modulation));
    be.layer_norm_modulate(
        out.view_mut(),
        ln.as_mut().map(|t| t.view_mut()),
        mean.view_mut(),
        rstd.view_mut(),
        x.view(),
        m.view(),
        c.which,
        c.dims,
        EPS,
    )
    .unwrap();
    (read(&out), ln.as_ref().map(read), read(&mean), read(&rstd))
}

/// (out, ln, mean, rstd) of `layer_norm` then `modulate`, all f32.
fn composed(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let be = cpu2();
    let (n, rows) = (c.x.len(), c.dims.batch * c.dims.tokens);
    let (mut out, mut ln) = (be.zeros(&[n], DType::F32).unwrap(), be.zeros(&[n], DType::F32).unwrap());
    let (mut mean, mut rstd) = (
        be.zeros(&[rows], DType::F32).unwrap(),
        be.zeros(&[rows], DType::F32).unwrap(),
    );
    let (x, m) = (up(DType::F32, &c.x), up(DType::F32, &c.modulation));
    be.layer_norm(
        ln.view_mut(),
        mean.view_mut(),
        rstd.view_mut(),
        x.view(),
        None,
        None,
        rows,
        c.dims.d,
        EPS,
    )
    .unwrap();
    be.modulate(out.view_mut(), ln.view(), m.view(), c.which, c.dims)
        .unwrap();
    (read(&out), read(&ln), read(&mean), read(&rstd))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn rounded(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32().to_bits()).collect()
}

proptest! {
    #[test]
    fn fused_f32_has_the_bits_of_layer_norm_then_modulate(
        batch in 1usize..4, tokens in 1usize..70, d in 1usize..200,
        chunks in 2usize..7, pick in 0usize..36, seed in 0u64..1000,
    ) {
        let (first, second) = (pick % chunks, (pick / 6) % chunks);
        let c = case(batch, tokens, d, chunks, first, second, seed);
        let (out, ln, mean, rstd) = composed(&c);
        let (f_out, f_ln, f_mean, f_rstd) = fused(&c, DType::F32, true);
        prop_assert_eq!(bits(&f_out), bits(&out));
        prop_assert_eq!(bits(&f_ln.unwrap()), bits(&ln));
        prop_assert_eq!((bits(&f_mean), bits(&f_rstd)), (bits(&mean), bits(&rstd)));
        // Without the kept LN output: the same out and statistics.
        let (n_out, n_ln, n_mean, n_rstd) = fused(&c, DType::F32, false);
        prop_assert!(n_ln.is_none());
        prop_assert_eq!(bits(&n_out), bits(&out));
        prop_assert_eq!((bits(&n_mean), bits(&n_rstd)), (bits(&mean), bits(&rstd)));
    }

    #[test]
    fn fused_bf16_is_the_f32_result_rounded_once(
        batch in 1usize..3, tokens in 1usize..300, d in 1usize..130, seed in 0u64..1000,
    ) {
        let c = case(batch, tokens, d, 6, 3, 4, seed);
        let (out, ln, mean, rstd) = composed(&c);
        let (b_out, b_ln, b_mean, b_rstd) = fused(&c, DType::BF16, true);
        prop_assert_eq!(bits(&b_out), rounded(&out));
        prop_assert_eq!(bits(&b_ln.unwrap()), rounded(&ln));
        prop_assert_eq!((bits(&b_mean), bits(&b_rstd)), (bits(&mean), bits(&rstd)));
        // Inference (no LN output kept) runs in blocks of rows: the same.
        let (n_out, _, n_mean, n_rstd) = fused(&c, DType::BF16, false);
        prop_assert_eq!(bits(&n_out), rounded(&out));
        prop_assert_eq!((bits(&n_mean), bits(&n_rstd)), (bits(&mean), bits(&rstd)));
    }
}

#[test]
fn wrong_lengths_and_chunks_are_errors_naming_them() {
    let be = cpu2();
    let c = case(2, 3, 8, 6, 0, 1, 7);
    let rows = 6;
    let (x, m) = (up(DType::F32, &c.x), up(DType::F32, &c.modulation));
    let run = |out_len: usize, which: ModChunks| {
        let mut out = be.zeros(&[out_len], DType::F32).unwrap();
        let (mut mean, mut rstd) = (
            be.zeros(&[rows], DType::F32).unwrap(),
            be.zeros(&[rows], DType::F32).unwrap(),
        );
        let r = be.layer_norm_modulate(
            out.view_mut(),
            None,
            mean.view_mut(),
            rstd.view_mut(),
            x.view(),
            m.view(),
            which,
            c.dims,
            EPS,
        );
        r.unwrap_err().to_string()
    };
    let short = run(c.x.len() - 1, c.which);
    assert!(
        short.contains("layer_norm_modulate") && short.contains("out"),
        "{short}"
    );
    let bad = run(
        c.x.len(),
        ModChunks {
            chunks: 6,
            first: 0,
            second: 6,
        },
    );
    assert!(bad.contains("second chunk"), "{bad}");
}
