//! `Linear`: `out = inp @ W + bias` with the weight held input-major
//! (`[in, out]` in memory, upstream `[out, in]` on disk), so the product is a
//! plain NN gemm with the bias fused.

use super::grads::Grads;
use ecdit_engine::{Backend, DType, GemmDims, Init, Layout, Param, Params, Result, TensorMut, TensorRef, Unary};

/// A linear layer with bias.
#[derive(Debug)]
pub struct Linear {
    /// `<prefix>.weight`: upstream `[out_dim, in_dim]` (the patch embedding's
    /// conv weight is `[d, C, p, p]`, held as stored).
    pub weight: Param,
    /// `<prefix>.bias`: [out_dim].
    pub bias: Param,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
    /// Output chunks held as separate input-major blocks (fused qkv: 3, kv: 2).
    chunks: usize,
}

impl Linear {
    /// A layer named `prefix` with weight `[out_dim, in_dim]` held input-major, bias zero.
    pub fn new(
        backend: &dyn Backend,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        init: Init,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(backend, prefix, &[out_dim, in_dim], Layout::InputMajor, 1, init, dtype)
    }

    /// Xavier-uniform weight, zero bias (DiT's default for `nn.Linear`).
    pub fn xavier(backend: &dyn Backend, prefix: &str, out_dim: usize, in_dim: usize, dtype: DType) -> Result<Self> {
        Self::new(backend, prefix, out_dim, in_dim, xavier(in_dim, out_dim), dtype)
    }

    /// A fused projection of `chunks` equal output parts (qkv, kv): the
    /// weight `[chunks * part, in]` is held as `chunks` input-major blocks
    /// `[in, part]`, so each part is its own gemm into its own contiguous
    /// output (attention reads q, k, v as separate tensors).
    pub fn fused(
        backend: &dyn Backend,
        prefix: &str,
        chunks: usize,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        let layout = Layout::InputMajorChunks(chunks);
        Self::build(
            backend,
            prefix,
            &[out_dim, in_dim],
            layout,
            chunks,
            xavier(in_dim, out_dim),
            dtype,
        )
    }

    /// A layer whose upstream weight shape is not `[out, in]` (the patch
    /// embedding's `[d, C, p, p]`): held as stored, read transposed.
    pub fn as_stored(
        backend: &dyn Backend,
        prefix: &str,
        weight_shape: &[usize],
        out_dim: usize,
        in_dim: usize,
        init: Init,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(backend, prefix, weight_shape, Layout::AsStored, 1, init, dtype).map(|l| Self {
            in_dim,
            out_dim,
            ..l
        })
    }

    fn build(
        backend: &dyn Backend,
        prefix: &str,
        weight_shape: &[usize],
        layout: Layout,
        chunks: usize,
        init: Init,
        dtype: DType,
    ) -> Result<Self> {
        let (out_dim, in_dim) = (weight_shape[0], weight_shape[1..].iter().product());
        Ok(Self {
            weight: Param::new(backend, format!("{prefix}.weight"), weight_shape, dtype, layout, init)?,
            bias: Param::new(
                backend,
                format!("{prefix}.bias"),
                &[out_dim],
                dtype,
                Layout::AsStored,
                Init::Zeros,
            )?,
            in_dim,
            out_dim,
            chunks,
        })
    }

    /// out: [rows, out_dim]; inp: [rows, in_dim].
    pub fn forward(&self, backend: &dyn Backend, out: TensorMut<'_>, inp: TensorRef<'_>, rows: usize) -> Result<()> {
        let (w, b) = (self.weight.tensor.view(), Some(self.bias.tensor.view()));
        backend.gemm(out, inp, w, b, self.dims(rows)?, 1.0, 0.0)
    }

    /// `act(forward(inp))`, fused where the backend can (an MLP's first
    /// layer at inference, which keeps no pre-activation).
    /// out: [rows, out_dim]; inp: [rows, in_dim].
    pub fn forward_act(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
        act: Unary,
    ) -> Result<()> {
        let (w, b) = (self.weight.tensor.view(), Some(self.bias.tensor.view()));
        backend.gemm_act(out, inp, w, b, self.dims(rows)?, act)
    }

    /// The whole layer's product on `rows` rows.
    fn dims(&self, rows: usize) -> Result<GemmDims> {
        match (self.chunks, self.weight.layout) {
            (1, Layout::AsStored) => Ok(GemmDims::nt(rows, self.out_dim, self.in_dim)),
            (1, _) => Ok(GemmDims::nn(rows, self.out_dim, self.in_dim)),
            // A fused layer into one [rows, out_dim] buffer: part by part
            // through a [rows, chunks, part] view would need strides.
            _ => Err(ecdit_engine::EngineError::Other(format!(
                "Linear::forward ({}): a fused projection runs part by part (forward_chunk)",
                self.weight.name
            ))),
        }
    }

    /// Output part `j` of a fused layer. out: [rows, out_dim / chunks]; inp: [rows, in_dim].
    pub fn forward_chunk(
        &self,
        backend: &dyn Backend,
        j: usize,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        rows: usize,
    ) -> Result<()> {
        let part = self.out_dim / self.chunks;
        let w = self.weight.tensor.view().rows(j, 1)?.reshape(&[self.in_dim, part])?;
        let b = self.bias.tensor.view().flat(j * part, part)?;
        backend.gemm(out, inp, w, Some(b), GemmDims::nn(rows, part, self.in_dim), 1.0, 0.0)
    }

    /// As [`Linear::forward`] (or part `chunk` of a fused layer), one
    /// sample's rows at a time, so each sample's output is the same bits
    /// whatever the batch size: a gemm's summation order may depend on its
    /// row count (the CPU gemm switches kernels for tiny products), and the
    /// products of per-sample rows (conditioning vectors, text tokens) are
    /// tiny. Image-token products stay batched.
    /// out: [samples * rows_per_sample, out]; inp: [samples * rows_per_sample, in_dim].
    pub fn forward_per_sample(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        samples: usize,
        rows_per_sample: usize,
        chunk: Option<usize>,
    ) -> Result<()> {
        let n = match chunk {
            Some(_) => self.out_dim / self.chunks,
            None => self.out_dim,
        };
        let rows = samples * rows_per_sample;
        out.expect_len("Linear::forward_per_sample", "out", rows * n)?;
        inp.expect_len("Linear::forward_per_sample", "inp", rows * self.in_dim)?;
        let mut out = out.reshape(&[rows, n])?;
        let inp = inp.reshape(&[rows, self.in_dim])?;
        // One row per sample (a conditioning vector): as many samples per
        // product as the backend computes row by row, so each weight is read
        // once per batch rather than once per sample, with the same bits.
        // (The promise covers plain products: input-major weights only.)
        let plain = self.weight.layout != Layout::AsStored;
        let per_call = if rows_per_sample == 1 && plain {
            backend.gemm_rows_alone().max(1)
        } else {
            1
        };
        if per_call > 1 {
            for s0 in (0..samples).step_by(per_call) {
                let m = per_call.min(samples - s0);
                let o = out.reborrow().rows(s0, m)?;
                let x = inp.rows(s0, m)?;
                match chunk {
                    Some(j) => self.forward_chunk(backend, j, o, x, m)?,
                    None => self.forward(backend, o, x, m)?,
                }
            }
            return Ok(());
        }
        for s in 0..samples {
            let o = out.reborrow().rows(s * rows_per_sample, rows_per_sample)?;
            let x = inp.rows(s * rows_per_sample, rows_per_sample)?;
            match chunk {
                Some(j) => self.forward_chunk(backend, j, o, x, rows_per_sample)?,
                None => self.forward(backend, o, x, rows_per_sample)?,
            }
        }
        Ok(())
    }
}

impl Linear {
    /// Backward of [`Linear::forward`]: accumulates `dW += inp^T dout` and
    /// `db += sum_rows(dout)` into `grads`; with `dinp`, writes `dout W^T`
    /// there (adds it when `accumulate`). dout: [rows, out_dim]; inp: [rows, in_dim].
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &dyn Backend,
        grads: &mut Grads,
        dinp: Option<TensorMut<'_>>,
        accumulate: bool,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        rows: usize,
    ) -> Result<()> {
        if self.chunks != 1 {
            return Err(ecdit_engine::EngineError::Other(format!(
                "Linear::backward ({}): a fused projection runs part by part (backward_chunk)",
                self.weight.name
            )));
        }
        let (n_in, n_out) = (self.in_dim, self.out_dim);
        let stored = self.weight.layout == Layout::AsStored;
        {
            let dw = grads.view_mut(&self.weight)?;
            if stored {
                // dW [out, in] += dout^T @ inp
                backend.gemm(dw, dout, inp, None, GemmDims::tn(n_out, n_in, rows), 1.0, 1.0)?;
            } else {
                // dW [in, out] += inp^T @ dout
                backend.gemm(dw, inp, dout, None, GemmDims::tn(n_in, n_out, rows), 1.0, 1.0)?;
            }
        }
        backend.sum_rows(grads.view_mut(&self.bias)?, dout, rows, n_out, true)?;
        if let Some(dinp) = dinp {
            let beta = if accumulate { 1.0 } else { 0.0 };
            let w = self.weight.tensor.view();
            let dims = if stored {
                GemmDims::nn(rows, n_in, n_out)
            } else {
                GemmDims::nt(rows, n_in, n_out)
            };
            backend.gemm(dinp, dout, w, None, dims, 1.0, beta)?;
        }
        Ok(())
    }

    /// Backward of [`Linear::forward_chunk`] (part `j` of a fused layer), as
    /// [`Linear::backward`]. dout: [rows, out_dim / chunks]; inp: [rows, in_dim].
    #[allow(clippy::too_many_arguments)]
    pub fn backward_chunk(
        &self,
        backend: &dyn Backend,
        j: usize,
        grads: &mut Grads,
        dinp: Option<TensorMut<'_>>,
        accumulate: bool,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        rows: usize,
    ) -> Result<()> {
        let (n_in, part) = (self.in_dim, self.out_dim / self.chunks);
        {
            // dW_j [in, part] += inp^T @ dout
            let dw = grads.view_mut(&self.weight)?.rows(j, 1)?.reshape(&[n_in, part])?;
            backend.gemm(dw, inp, dout, None, GemmDims::tn(n_in, part, rows), 1.0, 1.0)?;
        }
        let db = grads.view_mut(&self.bias)?.flat(j * part, part)?;
        backend.sum_rows(db, dout, rows, part, true)?;
        if let Some(dinp) = dinp {
            let w = self.weight.tensor.view().rows(j, 1)?.reshape(&[n_in, part])?;
            let beta = if accumulate { 1.0 } else { 0.0 };
            backend.gemm(dinp, dout, w, None, GemmDims::nt(rows, n_in, part), 1.0, beta)?;
        }
        Ok(())
    }
}

/// Xavier-uniform for a `[fan_out, fan_in]` matrix.
pub(crate) fn xavier(fan_in: usize, fan_out: usize) -> Init {
    Init::XavierUniform { fan_in, fan_out }
}

impl Params for Linear {
    fn collect<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.weight);
        out.push(&self.bias);
    }
    fn collect_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.weight);
        out.push(&mut self.bias);
    }
}
