//! Element-wise ops: broadcast add, axpby, activations, the optimiser steps.

use crate::backend::CudaBackend;
use crate::device::{f32_ptr, ten};
use cudarc::driver::PushKernelArg;
use ecdit_engine::error::check_len;
use ecdit_engine::{AdamW, EngineError, Result, RmsProp, TensorMut, TensorRef, Unary};

fn unary_code(op: Unary) -> i32 {
    match op {
        Unary::GeluTanh => 0,
        Unary::Silu => 1,
    }
}

impl CudaBackend {
    /// `out[i] += inp[i % inp.len()]`.
    pub(crate) fn add_broadcast_impl(&self, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        let op = "add_broadcast";
        let (o, i) = (ten(op, "out", out.as_ref())?, ten(op, "inp", inp)?);
        let (n, len) = (out.numel(), inp.numel());
        if n == 0 {
            return Ok(());
        }
        if len == 0 || !n.is_multiple_of(len) {
            return Err(EngineError::shape(
                format!("{op} (out)"),
                format!("a multiple of inp's {len} elements"),
                format!("{n} elements"),
            ));
        }
        let (n64, len64) = (n as u64, len as u64);
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().add_broadcast);
            args.arg(&o).arg(&i).arg(&n64).arg(&len64);
            self.launch(op, n, args)
        })
    }

    /// `y = a x + b y`, two products and one sum (the CPU backend's bits).
    pub(crate) fn axpby_impl(&self, y: TensorMut<'_>, a: f32, x: TensorRef<'_>, b: f32) -> Result<()> {
        let op = "axpby";
        check_len(op, "x", x.numel(), y.numel())?;
        let (yp, xp) = (ten(op, "y", y.as_ref())?, ten(op, "x", x)?);
        let n = y.numel() as u64;
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().axpby);
            args.arg(&yp).arg(&xp).arg(&n).arg(&a).arg(&b);
            self.launch(op, n as usize, args)
        })
    }

    /// Element-wise activation.
    pub(crate) fn unary_impl(&self, act: Unary, out: TensorMut<'_>, inp: TensorRef<'_>) -> Result<()> {
        let op = "unary";
        check_len(op, "out", out.numel(), inp.numel())?;
        let (o, i) = (ten(op, "out", out.as_ref())?, ten(op, "inp", inp)?);
        let (n, code) = (inp.numel() as u64, unary_code(act));
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().unary_forward);
            args.arg(&o).arg(&i).arg(&n).arg(&code);
            self.launch(op, n as usize, args)
        })
    }

    /// `dinp = dout * act'(inp)`.
    pub(crate) fn unary_backward_impl(
        &self,
        act: Unary,
        dinp: TensorMut<'_>,
        dout: TensorRef<'_>,
        inp: TensorRef<'_>,
    ) -> Result<()> {
        let op = "unary_backward";
        check_len(op, "dinp", dinp.numel(), inp.numel())?;
        check_len(op, "dout", dout.numel(), inp.numel())?;
        let (di, d, i) = (
            ten(op, "dinp", dinp.as_ref())?,
            ten(op, "dout", dout)?,
            ten(op, "inp", inp)?,
        );
        let (n, code) = (inp.numel() as u64, unary_code(act));
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().unary_backward);
            args.arg(&di).arg(&d).arg(&i).arg(&n).arg(&code);
            self.launch(op, n as usize, args)
        })
    }

    /// One AdamW step on f32 tensors, the CPU backend's arithmetic (bias
    /// corrections in f64 on the host, rounded to f32).
    pub(crate) fn adamw_impl(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        m: TensorMut<'_>,
        v: TensorMut<'_>,
        hp: AdamW,
        step: u64,
    ) -> Result<()> {
        let op = "adamw_step";
        let n = param.numel();
        check_len(op, "grad", grad.numel(), n)?;
        check_len(op, "m", m.numel(), n)?;
        check_len(op, "v", v.numel(), n)?;
        if step == 0 {
            return Err(EngineError::param(op, "step", step, "steps count from 1"));
        }
        let (p, g, mp, vp) = (
            f32_ptr(op, "param", param.as_ref())?,
            f32_ptr(op, "grad", grad)?,
            f32_ptr(op, "m", m.as_ref())?,
            f32_ptr(op, "v", v.as_ref())?,
        );
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt() as f32;
        let step_size = (hp.lr as f64 / bc1) as f32;
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let n64 = n as u64;
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().adamw_step);
            args.arg(&p)
                .arg(&mp)
                .arg(&vp)
                .arg(&g)
                .arg(&n64)
                .arg(&hp.beta1)
                .arg(&hp.beta2)
                .arg(&hp.eps)
                .arg(&decay)
                .arg(&step_size)
                .arg(&bc2_sqrt);
            self.launch(op, n, args)
        })
    }

    /// One RMSProp-with-momentum step on f32 tensors ([`RmsProp::update`] per element).
    pub(crate) fn rmsprop_impl(
        &self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        v: TensorMut<'_>,
        buf: TensorMut<'_>,
        hp: RmsProp,
    ) -> Result<()> {
        let op = "rmsprop_step";
        let n = param.numel();
        check_len(op, "grad", grad.numel(), n)?;
        check_len(op, "v", v.numel(), n)?;
        check_len(op, "buf", buf.numel(), n)?;
        let (p, g, vp, bp) = (
            f32_ptr(op, "param", param.as_ref())?,
            f32_ptr(op, "grad", grad)?,
            f32_ptr(op, "v", v.as_ref())?,
            f32_ptr(op, "buf", buf.as_ref())?,
        );
        let n64 = n as u64;
        self.run(op, || {
            let mut args = self.stream().launch_builder(&self.kernels().rmsprop_step);
            args.arg(&p)
                .arg(&vp)
                .arg(&bp)
                .arg(&g)
                .arg(&n64)
                .arg(&hp.lr)
                .arg(&hp.alpha)
                .arg(&hp.eps)
                .arg(&hp.momentum)
                .arg(&hp.weight_decay);
            self.launch(op, n, args)
        })
    }
}
