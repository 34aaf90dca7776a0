//! adaLN ops: modulate and the gated residual, with their backward.

use crate::backend::CudaBackend;
use crate::device::{numel, ten};
use cudarc::driver::PushKernelArg;
use ecdit_engine::error::check_len;
use ecdit_engine::{EngineError, ModChunks, Result, RowDims, TensorMut, TensorRef};

/// Checks the chunk indices (`second` too when the op reads it); returns the
/// element counts of the activations `[B, T, d]` and the modulation `[B, chunks d]`.
fn lens(op: &str, which: ModChunks, dims: RowDims, second: bool) -> Result<(usize, usize)> {
    let bad = |what: &str, i: usize| {
        EngineError::shape(
            format!("{op} ({what} chunk)"),
            format!("an index below chunks = {}", which.chunks),
            i,
        )
    };
    if which.first >= which.chunks {
        return Err(bad("first", which.first));
    }
    if second && which.second >= which.chunks {
        return Err(bad("second", which.second));
    }
    Ok((
        numel(op, &[dims.batch, dims.tokens, dims.d])?,
        numel(op, &[dims.batch, which.chunks, dims.d])?,
    ))
}

/// The kernels' size arguments.
struct Sizes {
    batch: u64,
    tokens: u64,
    d: u64,
    chunks: u64,
    first: u64,
    second: u64,
}

fn sizes(which: ModChunks, dims: RowDims) -> Sizes {
    Sizes {
        batch: dims.batch as u64,
        tokens: dims.tokens as u64,
        d: dims.d as u64,
        chunks: which.chunks as u64,
        first: which.first as u64,
        second: which.second as u64,
    }
}

impl CudaBackend {
    /// `out = inp * (1 + scale) + shift`.
    pub(crate) fn modulate_impl(
        &self,
        out: TensorMut<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "modulate";
        let (act, modl) = lens(op, which, dims, true)?;
        check_len(op, "out", out.numel(), act)?;
        check_len(op, "inp", inp.numel(), act)?;
        check_len(op, "modulation", modulation.numel(), modl)?;
        let (o, i, m) = (
            ten(op, "out", out.as_ref())?,
            ten(op, "inp", inp)?,
            ten(op, "modulation", modulation)?,
        );
        let s = sizes(which, dims);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().modulate);
            args.arg(&o)
                .arg(&i)
                .arg(&m)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.first)
                .arg(&s.second);
            self.launch(op, act, args)
        })
    }

    /// `dinp = dout (1 + scale)`; `dshift += sum_t dout`, `dscale += sum_t dout inp`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn modulate_backward_impl(
        &self,
        dinp: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "modulate_backward";
        let (act, modl) = lens(op, which, dims, true)?;
        check_len(op, "dinp", dinp.numel(), act)?;
        check_len(op, "dmodulation", dmodulation.numel(), modl)?;
        check_len(op, "dout", dout.numel(), act)?;
        check_len(op, "inp", inp.numel(), act)?;
        check_len(op, "modulation", modulation.numel(), modl)?;
        let (di, dm, d, i, m) = (
            ten(op, "dinp", dinp.as_ref())?,
            ten(op, "dmodulation", dmodulation.as_ref())?,
            ten(op, "dout", dout)?,
            ten(op, "inp", inp)?,
            ten(op, "modulation", modulation)?,
        );
        let s = sizes(which, dims);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().modulate_backward_input);
            args.arg(&di)
                .arg(&d)
                .arg(&m)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.second);
            self.launch(op, act, args)?;
            let mut args = self.stream().launch_builder(&self.kernels().modulate_backward_params);
            args.arg(&dm)
                .arg(&d)
                .arg(&i)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.first)
                .arg(&s.second);
            self.launch(op, dims.batch * dims.d, args)
        })
    }

    /// `x += gate * y`.
    pub(crate) fn gated_residual_impl(
        &self,
        x: TensorMut<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "gated_residual";
        let (act, modl) = lens(op, which, dims, false)?;
        check_len(op, "x", x.numel(), act)?;
        check_len(op, "y", y.numel(), act)?;
        check_len(op, "modulation", modulation.numel(), modl)?;
        let (xp, yp, m) = (
            ten(op, "x", x.as_ref())?,
            ten(op, "y", y)?,
            ten(op, "modulation", modulation)?,
        );
        let s = sizes(which, dims);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().gated_residual);
            args.arg(&xp)
                .arg(&yp)
                .arg(&m)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.first);
            self.launch(op, act, args)
        })
    }

    /// `dy = gate dx`; `dgate += sum_t dx y`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gated_residual_backward_impl(
        &self,
        dy: TensorMut<'_>,
        dmodulation: TensorMut<'_>,
        dx: TensorRef<'_>,
        y: TensorRef<'_>,
        modulation: TensorRef<'_>,
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let op = "gated_residual_backward";
        let (act, modl) = lens(op, which, dims, false)?;
        check_len(op, "dy", dy.numel(), act)?;
        check_len(op, "dmodulation", dmodulation.numel(), modl)?;
        check_len(op, "dx", dx.numel(), act)?;
        check_len(op, "y", y.numel(), act)?;
        check_len(op, "modulation", modulation.numel(), modl)?;
        let (dyp, dm, dxp, yp, m) = (
            ten(op, "dy", dy.as_ref())?,
            ten(op, "dmodulation", dmodulation.as_ref())?,
            ten(op, "dx", dx)?,
            ten(op, "y", y)?,
            ten(op, "modulation", modulation)?,
        );
        let s = sizes(which, dims);
        self.run(op, || {
            let mut args = self
                .stream()
                .launch_builder(&self.kernels().gated_residual_backward_input);
            args.arg(&dyp)
                .arg(&dxp)
                .arg(&m)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.first);
            self.launch(op, act, args)?;
            let mut args = self
                .stream()
                .launch_builder(&self.kernels().gated_residual_backward_params);
            args.arg(&dm)
                .arg(&dxp)
                .arg(&yp)
                .arg(&s.batch)
                .arg(&s.tokens)
                .arg(&s.d)
                .arg(&s.chunks)
                .arg(&s.first);
            self.launch(op, dims.batch * dims.d, args)
        })
    }
}
