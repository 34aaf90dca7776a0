//! The backend's ops on host slices, for tests written against values: each
//! call uploads its slices as 1-D f32 (u32, u8) tensors, runs the op and
//! downloads the outputs back into the slices. Outputs are uploaded first, so
//! ops that read them (beta != 0, accumulate) see the old values.
#![allow(dead_code, clippy::too_many_arguments)]

use ecdit_engine::{
    AdamW, AttnDims, Backend, BackendExt, DType, GemmDims, ModChunks, PatchDims, Result, RowDims, Tensor, Unary,
};

/// A 1-D f32 tensor holding `data`.
pub fn f32_t<B: Backend + ?Sized>(be: &B, data: &[f32]) -> Tensor {
    be.upload_f32(&[data.len()], data, DType::F32).expect("upload f32")
}

/// A 1-D u32 tensor holding `data`.
pub fn u32_t<B: Backend + ?Sized>(be: &B, data: &[u32]) -> Tensor {
    be.upload_u32(&[data.len()], data).expect("upload u32")
}

/// A 1-D u8 tensor holding `data`.
pub fn u8_t<B: Backend + ?Sized>(be: &B, data: &[u8]) -> Tensor {
    be.upload_u8(&[data.len()], data).expect("upload u8")
}

/// Copies a float tensor's values into `dst`.
pub fn back<B: Backend + ?Sized>(be: &B, dst: &mut [f32], t: &Tensor) {
    dst.copy_from_slice(&be.read_f32(t.view()).expect("download f32"));
}

/// Copies a u32 tensor's values into `dst`.
pub fn back_u32<B: Backend + ?Sized>(be: &B, dst: &mut [u32], t: &Tensor) {
    dst.copy_from_slice(&be.read_u32(t.view()).expect("download u32"));
}

/// The ops of [`Backend`] on host slices (names end in `_h`).
pub trait HostOps {
    fn gemm_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        d: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;
    fn gemm_batched_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        d: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;
    fn gemm_grouped_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        groups: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;
    fn add_broadcast_h(&self, out: &mut [f32], inp: &[f32]) -> Result<()>;
    fn axpby_h(&self, y: &mut [f32], a: f32, x: &[f32], b: f32) -> Result<()>;
    fn sum_rows_h(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, acc: bool) -> Result<()>;
    fn softmax_rows_h(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()>;
    fn softmax_rows_backward_h(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    fn layer_norm_h(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    fn layer_norm_backward_h(
        &self,
        dinp: &mut [f32],
        dw: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        w: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    fn unary_h(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()>;
    fn unary_backward_h(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()>;
    fn modulate_h(&self, out: &mut [f32], inp: &[f32], m: &[f32], which: ModChunks, dims: RowDims) -> Result<()>;
    fn modulate_backward_h(
        &self,
        dinp: &mut [f32],
        dm: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        m: &[f32],
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;
    fn gated_residual_h(&self, x: &mut [f32], y: &[f32], m: &[f32], which: ModChunks, dims: RowDims) -> Result<()>;
    fn gated_residual_backward_h(
        &self,
        dy: &mut [f32],
        dm: &mut [f32],
        dx: &[f32],
        y: &[f32],
        m: &[f32],
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()>;
    fn patchify_h(&self, out: &mut [f32], inp: &[f32], dims: PatchDims) -> Result<()>;
    fn unpatchify_h(&self, out: &mut [f32], inp: &[f32], dims: PatchDims) -> Result<()>;
    fn timestep_features_h(&self, out: &mut [f32], t: &[f32], dim: usize, max_period: f32) -> Result<()>;
    fn attention_h(
        &self,
        out: &mut [f32],
        probs: Option<&mut [f32]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        d: AttnDims,
    ) -> Result<()>;
    fn attention_backward_h(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
    ) -> Result<()>;
    fn gather_rows_h(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()>;
    fn scatter_add_rows_h(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()>;
    fn gather_dot_h(&self, out: &mut [f32], a: &[f32], idx: &[u32], b: &[f32], cols: usize) -> Result<()>;
    fn top_k_rows_h(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()>;
    fn router_softmax_h(&self, out: &mut [f32], scores: &[f32], rows: usize, experts: usize) -> Result<()>;
    fn top_k_tokens_h(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        probs: &[f32],
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()>;
    fn adamw_step_h(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW, step: u64) -> Result<()>;
}

impl<B: Backend + ?Sized> HostOps for B {
    fn gemm_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        d: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (mut o, a, b) = (f32_t(self, out), f32_t(self, a), f32_t(self, b));
        let bias = bias.map(|x| f32_t(self, x));
        self.gemm(
            o.view_mut(),
            a.view(),
            b.view(),
            bias.as_ref().map(|t| t.view()),
            d,
            alpha,
            beta,
        )?;
        back(self, out, &o);
        Ok(())
    }
    fn gemm_batched_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        batch: usize,
        d: GemmDims,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (mut o, a, b) = (f32_t(self, out), f32_t(self, a), f32_t(self, b));
        self.gemm_batched(o.view_mut(), a.view(), b.view(), batch, d, alpha, beta)?;
        back(self, out, &o);
        Ok(())
    }
    fn gemm_grouped_h(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        groups: &[usize],
        n: usize,
        k: usize,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let (mut o, a, b) = (f32_t(self, out), f32_t(self, a), f32_t(self, b));
        self.gemm_grouped(o.view_mut(), a.view(), b.view(), groups, n, k, trans_b, alpha, beta)?;
        back(self, out, &o);
        Ok(())
    }
    fn add_broadcast_h(&self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.add_broadcast(o.view_mut(), i.view())?;
        back(self, out, &o);
        Ok(())
    }
    fn axpby_h(&self, y: &mut [f32], a: f32, x: &[f32], b: f32) -> Result<()> {
        let (mut yt, xt) = (f32_t(self, y), f32_t(self, x));
        self.axpby(yt.view_mut(), a, xt.view(), b)?;
        back(self, y, &yt);
        Ok(())
    }
    fn sum_rows_h(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize, acc: bool) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.sum_rows(o.view_mut(), i.view(), rows, cols, acc)?;
        back(self, out, &o);
        Ok(())
    }
    fn softmax_rows_h(&self, out: &mut [f32], inp: &[f32], rows: usize, cols: usize) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.softmax_rows(o.view_mut(), i.view(), rows, cols)?;
        back(self, out, &o);
        Ok(())
    }
    fn softmax_rows_backward_h(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        out: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (mut di, d, o) = (f32_t(self, dinp), f32_t(self, dout), f32_t(self, out));
        self.softmax_rows_backward(di.view_mut(), d.view(), o.view(), rows, cols)?;
        back(self, dinp, &di);
        Ok(())
    }
    fn layer_norm_h(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let (mut o, mut mu, mut rs, i) = (f32_t(self, out), f32_t(self, mean), f32_t(self, rstd), f32_t(self, inp));
        let (w, b) = (w.map(|x| f32_t(self, x)), b.map(|x| f32_t(self, x)));
        self.layer_norm(
            o.view_mut(),
            mu.view_mut(),
            rs.view_mut(),
            i.view(),
            w.as_ref().map(|t| t.view()),
            b.as_ref().map(|t| t.view()),
            rows,
            cols,
            eps,
        )?;
        back(self, out, &o);
        back(self, mean, &mu);
        back(self, rstd, &rs);
        Ok(())
    }
    fn layer_norm_backward_h(
        &self,
        dinp: &mut [f32],
        dw: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        mean: &[f32],
        rstd: &[f32],
        w: Option<&[f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let mut di = f32_t(self, dinp);
        let mut dwt = dw.as_deref().map(|x| f32_t(self, x));
        let mut dbt = db.as_deref().map(|x| f32_t(self, x));
        let (d, i, mu, rs) = (
            f32_t(self, dout),
            f32_t(self, inp),
            f32_t(self, mean),
            f32_t(self, rstd),
        );
        let wt = w.map(|x| f32_t(self, x));
        self.layer_norm_backward(
            di.view_mut(),
            dwt.as_mut().map(|t| t.view_mut()),
            dbt.as_mut().map(|t| t.view_mut()),
            d.view(),
            i.view(),
            mu.view(),
            rs.view(),
            wt.as_ref().map(|t| t.view()),
            rows,
            cols,
        )?;
        back(self, dinp, &di);
        if let (Some(dw), Some(t)) = (dw, &dwt) {
            back(self, dw, t);
        }
        if let (Some(db), Some(t)) = (db, &dbt) {
            back(self, db, t);
        }
        Ok(())
    }
    fn unary_h(&self, op: Unary, out: &mut [f32], inp: &[f32]) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.unary(op, o.view_mut(), i.view())?;
        back(self, out, &o);
        Ok(())
    }
    fn unary_backward_h(&self, op: Unary, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        let (mut di, d, i) = (f32_t(self, dinp), f32_t(self, dout), f32_t(self, inp));
        self.unary_backward(op, di.view_mut(), d.view(), i.view())?;
        back(self, dinp, &di);
        Ok(())
    }
    fn modulate_h(&self, out: &mut [f32], inp: &[f32], m: &[f32], which: ModChunks, dims: RowDims) -> Result<()> {
        let (mut o, i, mt) = (f32_t(self, out), f32_t(self, inp), f32_t(self, m));
        self.modulate(o.view_mut(), i.view(), mt.view(), which, dims)?;
        back(self, out, &o);
        Ok(())
    }
    fn modulate_backward_h(
        &self,
        dinp: &mut [f32],
        dm: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        m: &[f32],
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let (mut di, mut dmt) = (f32_t(self, dinp), f32_t(self, dm));
        let (d, i, mt) = (f32_t(self, dout), f32_t(self, inp), f32_t(self, m));
        self.modulate_backward(
            di.view_mut(),
            dmt.view_mut(),
            d.view(),
            i.view(),
            mt.view(),
            which,
            dims,
        )?;
        back(self, dinp, &di);
        back(self, dm, &dmt);
        Ok(())
    }
    fn gated_residual_h(&self, x: &mut [f32], y: &[f32], m: &[f32], which: ModChunks, dims: RowDims) -> Result<()> {
        let (mut xt, yt, mt) = (f32_t(self, x), f32_t(self, y), f32_t(self, m));
        self.gated_residual(xt.view_mut(), yt.view(), mt.view(), which, dims)?;
        back(self, x, &xt);
        Ok(())
    }
    fn gated_residual_backward_h(
        &self,
        dy: &mut [f32],
        dm: &mut [f32],
        dx: &[f32],
        y: &[f32],
        m: &[f32],
        which: ModChunks,
        dims: RowDims,
    ) -> Result<()> {
        let (mut dyt, mut dmt) = (f32_t(self, dy), f32_t(self, dm));
        let (dxt, yt, mt) = (f32_t(self, dx), f32_t(self, y), f32_t(self, m));
        self.gated_residual_backward(
            dyt.view_mut(),
            dmt.view_mut(),
            dxt.view(),
            yt.view(),
            mt.view(),
            which,
            dims,
        )?;
        back(self, dy, &dyt);
        back(self, dm, &dmt);
        Ok(())
    }
    fn patchify_h(&self, out: &mut [f32], inp: &[f32], dims: PatchDims) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.patchify(o.view_mut(), i.view(), dims)?;
        back(self, out, &o);
        Ok(())
    }
    fn unpatchify_h(&self, out: &mut [f32], inp: &[f32], dims: PatchDims) -> Result<()> {
        let (mut o, i) = (f32_t(self, out), f32_t(self, inp));
        self.unpatchify(o.view_mut(), i.view(), dims)?;
        back(self, out, &o);
        Ok(())
    }
    fn timestep_features_h(&self, out: &mut [f32], t: &[f32], dim: usize, max_period: f32) -> Result<()> {
        let (mut o, tt) = (f32_t(self, out), f32_t(self, t));
        self.timestep_features(o.view_mut(), tt.view(), dim, max_period)?;
        back(self, out, &o);
        Ok(())
    }
    fn attention_h(
        &self,
        out: &mut [f32],
        probs: Option<&mut [f32]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        d: AttnDims,
    ) -> Result<()> {
        let mut o = f32_t(self, out);
        let mut p = probs.as_deref().map(|x| f32_t(self, x));
        let (qt, kt, vt) = (f32_t(self, q), f32_t(self, k), f32_t(self, v));
        let mt = mask.map(|m| u8_t(self, m));
        self.attention(
            o.view_mut(),
            p.as_mut().map(|t| t.view_mut()),
            qt.view(),
            kt.view(),
            vt.view(),
            mt.as_ref().map(|t| t.view()),
            d,
        )?;
        back(self, out, &o);
        if let (Some(probs), Some(t)) = (probs, &p) {
            back(self, probs, t);
        }
        Ok(())
    }
    fn attention_backward_h(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        probs: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
    ) -> Result<()> {
        let (mut dqt, mut dkt, mut dvt) = (f32_t(self, dq), f32_t(self, dk), f32_t(self, dv));
        let (dt, pt) = (f32_t(self, dout), f32_t(self, probs));
        let (qt, kt, vt) = (f32_t(self, q), f32_t(self, k), f32_t(self, v));
        self.attention_backward(
            dqt.view_mut(),
            dkt.view_mut(),
            dvt.view_mut(),
            dt.view(),
            pt.view(),
            qt.view(),
            kt.view(),
            vt.view(),
            d,
        )?;
        back(self, dq, &dqt);
        back(self, dk, &dkt);
        back(self, dv, &dvt);
        Ok(())
    }
    fn gather_rows_h(&self, out: &mut [f32], inp: &[f32], idx: &[u32], cols: usize) -> Result<()> {
        let (mut o, i, ix) = (f32_t(self, out), f32_t(self, inp), u32_t(self, idx));
        self.gather_rows(o.view_mut(), i.view(), ix.view(), cols)?;
        back(self, out, &o);
        Ok(())
    }
    fn scatter_add_rows_h(
        &self,
        out: &mut [f32],
        inp: &[f32],
        idx: &[u32],
        scale: Option<&[f32]>,
        cols: usize,
    ) -> Result<()> {
        let (mut o, i, ix) = (f32_t(self, out), f32_t(self, inp), u32_t(self, idx));
        let s = scale.map(|x| f32_t(self, x));
        self.scatter_add_rows(o.view_mut(), i.view(), ix.view(), s.as_ref().map(|t| t.view()), cols)?;
        back(self, out, &o);
        Ok(())
    }
    fn gather_dot_h(&self, out: &mut [f32], a: &[f32], idx: &[u32], b: &[f32], cols: usize) -> Result<()> {
        let (mut o, at, ix, bt) = (f32_t(self, out), f32_t(self, a), u32_t(self, idx), f32_t(self, b));
        self.gather_dot(o.view_mut(), at.view(), ix.view(), bt.view(), cols)?;
        back(self, out, &o);
        Ok(())
    }
    fn top_k_rows_h(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        inp: &[f32],
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        let (mut ix, mut vt, i) = (u32_t(self, idx), f32_t(self, val), f32_t(self, inp));
        self.top_k_rows(ix.view_mut(), vt.view_mut(), i.view(), rows, cols, k)?;
        back_u32(self, idx, &ix);
        back(self, val, &vt);
        Ok(())
    }
    fn router_softmax_h(&self, out: &mut [f32], scores: &[f32], rows: usize, experts: usize) -> Result<()> {
        let (mut o, s) = (f32_t(self, out), f32_t(self, scores));
        self.router_softmax(o.view_mut(), s.view(), rows, experts)?;
        back(self, out, &o);
        Ok(())
    }
    fn top_k_tokens_h(
        &self,
        idx: &mut [u32],
        val: &mut [f32],
        probs: &[f32],
        groups: usize,
        group_rows: usize,
        experts: usize,
        k: usize,
    ) -> Result<()> {
        let (mut ix, mut vt, p) = (u32_t(self, idx), f32_t(self, val), f32_t(self, probs));
        self.top_k_tokens(ix.view_mut(), vt.view_mut(), p.view(), groups, group_rows, experts, k)?;
        back_u32(self, idx, &ix);
        back(self, val, &vt);
        Ok(())
    }
    fn adamw_step_h(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW, step: u64) -> Result<()> {
        let (mut pt, gt, mut mt, mut vt) = (f32_t(self, p), f32_t(self, g), f32_t(self, m), f32_t(self, v));
        self.adamw_step(pt.view_mut(), gt.view(), mt.view_mut(), vt.view_mut(), hp, step)?;
        back(self, p, &pt);
        back(self, m, &mt);
        back(self, v, &vt);
        Ok(())
    }
}
