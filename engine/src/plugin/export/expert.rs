//! Experts out of a plugin. An expert computes through the backend the host
//! lends it for the call ([`BackendRef`]), seen here through the host-side
//! table adapter: the host's tensors arrive as descriptors of the host's
//! buffers and are wrapped (not owned) for the call; the tensors the expert
//! caches are handed to the host through the [`TensorSink`].

use super::{create, destroy, guard, not_null, obj, quiet, Header, Instance};
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::expert::{Expert, ExpertCache, ParamShape};
use crate::param::{Init, Layout};
use crate::plugin::abi::*;
use crate::plugin::host::backend::TableBackend;
use crate::plugin::host::Call;
use crate::tensor::{Tensor, TensorMut, TensorRef};
use serde_json::{json, Value};
use std::ffi::{c_char, c_void};

impl Instance for Box<dyn Expert> {
    fn into_handle(self) -> *mut c_void {
        Box::into_raw(Box::new(self)) as *mut c_void
    }
    unsafe fn drop_handle(h: *mut c_void) {
        drop(Box::from_raw(h as *mut Self));
    }
}

/// The table of one expert kind.
pub(crate) fn table(h: Header) -> ExpertVtable {
    ExpertVtable {
        abi_version: ABI_VERSION,
        struct_size: std::mem::size_of::<ExpertVtable>() as u32,
        kind: h.kind,
        description: h.description,
        params_json: h.params_json,
        ctx: h.ctx,
        create: Some(create::<Box<dyn Expert>>),
        destroy: Some(destroy::<Box<dyn Expert>>),
        hidden: Some(expert_hidden),
        flops_per_token: Some(expert_flops_per_token),
        param_shapes: Some(expert_param_shapes),
        forward: Some(expert_forward),
        backward: Some(expert_backward),
    }
}

/// The JSON form of a parameter list (see [`ExpertVtable::param_shapes`]).
pub(crate) fn param_shapes_json(shapes: &[ParamShape]) -> Value {
    let one = |p: &ParamShape| {
        let layout = match p.layout {
            Layout::AsStored => json!("as_stored"),
            Layout::InputMajor => json!("input_major"),
            Layout::InputMajorChunks(k) => json!({ "input_major_chunks": k }),
        };
        let init = match p.init {
            Init::Zeros => json!("zeros"),
            Init::Ones => json!("ones"),
            Init::Fixed => json!("fixed"),
            Init::Normal(std) => json!({ "normal": std }),
            Init::XavierUniform { fan_in, fan_out } => json!({ "xavier_uniform": [fan_in, fan_out] }),
        };
        json!({"name": p.name, "shape": p.shape, "layout": layout, "init": init})
    };
    Value::Array(shapes.iter().map(one).collect())
}

unsafe extern "C" fn expert_hidden(h: *mut c_void, d: usize) -> usize {
    quiet(0, || obj::<dyn Expert>(h).map_or(0, |e| e.hidden(d)))
}

unsafe extern "C" fn expert_flops_per_token(h: *mut c_void, d: usize) -> f64 {
    quiet(f64::NAN, || {
        obj::<dyn Expert>(h).map_or(f64::NAN, |e| e.flops_per_token(d))
    })
}

unsafe extern "C" fn expert_param_shapes(
    h: *mut c_void,
    d: usize,
    experts: usize,
    out: *mut c_char,
    cap: usize,
    len: *mut usize,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        not_null(len, "len")?;
        let text = param_shapes_json(&obj::<dyn Expert>(h)?.param_shapes(d, experts)).to_string();
        *len = text.len();
        if text.len() <= cap {
            not_null(out, "out")?;
            std::ptr::copy_nonoverlapping(text.as_ptr(), out as *mut u8, text.len());
        }
        Ok(())
    })
}

unsafe fn descs<'a>(p: *const TensorDesc, n: usize, what: &str) -> Result<&'a [TensorDesc]> {
    if n == 0 {
        return Ok(&[]);
    }
    not_null(p, what)?;
    crate::plugin::check_count(n, crate::plugin::MAX_LIST, size_of::<TensorDesc>(), what)?;
    Ok(std::slice::from_raw_parts(p, n))
}

unsafe fn desc<'a>(p: *const TensorDesc, what: &str) -> Result<&'a TensorDesc> {
    not_null(p, what)?;
    Ok(&*p)
}

fn parts(d: &TensorDesc) -> Result<(&[usize], DType)> {
    let (dtype, dims, _) = d.decode("tensor")?;
    Ok((dims, dtype))
}

/// A shared view of a borrowed host buffer (made by `TableBackend::borrow`,
/// which sized it to this very view).
fn view<'a>(buffer: &'a Buffer, d: &'a TensorDesc) -> Result<TensorRef<'a>> {
    let (dims, dtype) = parts(d)?;
    // SAFETY: `borrow` sized the buffer to offset + numel of this descriptor.
    unsafe { TensorRef::from_raw_parts(buffer, d.offset, dims, dtype) }
}

/// An exclusive view (the host passed it as an output, exclusively borrowed).
fn view_mut<'a>(buffer: &'a Buffer, d: &'a TensorDesc) -> Result<TensorMut<'a>> {
    let (dims, dtype) = parts(d)?;
    // SAFETY: as `view`; the host's borrow rules make it exclusive.
    unsafe { TensorMut::from_raw_parts(buffer, d.offset, dims, dtype) }
}

unsafe fn offsets<'a>(p: *const usize, n: usize) -> Result<&'a [usize]> {
    if n == 0 {
        return Ok(&[]);
    }
    not_null(p, "offsets")?;
    crate::plugin::check_count(n, isize::MAX as usize, size_of::<usize>(), "offsets")?;
    Ok(std::slice::from_raw_parts(p, n))
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn expert_forward(
    h: *mut c_void,
    backend: *const BackendRef,
    out: *const TensorDesc,
    cache: *const TensorSink,
    x: *const TensorDesc,
    params: *const TensorDesc,
    n_params: usize,
    offs: *const usize,
    n_offsets: usize,
    d: usize,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        let expert = obj::<dyn Expert>(h)?;
        let be = TableBackend::lent(backend, "host")?;
        let (out, x, params) = (desc(out, "out")?, desc(x, "x")?, descs(params, n_params, "params")?);
        let (out_b, x_b) = (be.borrow(out, "out")?, be.borrow(x, "x")?);
        let param_b = params
            .iter()
            .map(|p| be.borrow(p, "params"))
            .collect::<Result<Vec<_>>>()?;
        let param_v = param_b
            .iter()
            .zip(params)
            .map(|(b, p)| view(b, p))
            .collect::<Result<Vec<_>>>()?;
        let (out_v, x_v, offs) = (view_mut(&out_b, out)?, view(&x_b, x)?, offsets(offs, n_offsets)?);
        let Some(sink) = cache.as_ref() else {
            return expert.forward(&be, out_v, &mut ExpertCache::default(), false, x_v, &param_v, offs, d);
        };
        let push = sink
            .push
            .ok_or_else(|| EngineError::Other("the cache sink has a null push".into()))?;
        let mut c = ExpertCache::default();
        expert.forward(&be, out_v, &mut c, true, x_v, &param_v, offs, d)?;
        for t in c.tensors {
            be.hand_over(t, |desc| {
                let mut call = Call::new();
                let mut e = call.err();
                let status = push(sink.ctx, desc, &mut e);
                call.check(status, "host", "expert cache push")
            })?;
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn expert_backward(
    h: *mut c_void,
    backend: *const BackendRef,
    dx: *const TensorDesc,
    dparams: *const TensorDesc,
    n_dparams: usize,
    dout: *const TensorDesc,
    cache: *const TensorDesc,
    n_cache: usize,
    x: *const TensorDesc,
    params: *const TensorDesc,
    n_params: usize,
    offs: *const usize,
    n_offsets: usize,
    d: usize,
    err: *mut ErrBuf,
) -> i32 {
    guard(err, || {
        let expert = obj::<dyn Expert>(h)?;
        let be = TableBackend::lent(backend, "host")?;
        let (dx, dout, x) = (desc(dx, "dx")?, desc(dout, "dout")?, desc(x, "x")?);
        let (dparams, cache) = (descs(dparams, n_dparams, "dparams")?, descs(cache, n_cache, "cache")?);
        let params = descs(params, n_params, "params")?;
        let (dx_b, dout_b, x_b) = (be.borrow(dx, "dx")?, be.borrow(dout, "dout")?, be.borrow(x, "x")?);
        let borrow_all =
            |list: &[TensorDesc], what: &str| list.iter().map(|t| be.borrow(t, what)).collect::<Result<Vec<_>>>();
        let (dparam_b, param_b) = (borrow_all(dparams, "dparams")?, borrow_all(params, "params")?);
        let mut dparam_v = dparam_b
            .iter()
            .zip(dparams)
            .map(|(b, p)| view_mut(b, p))
            .collect::<Result<Vec<_>>>()?;
        let param_v = param_b
            .iter()
            .zip(params)
            .map(|(b, p)| view(b, p))
            .collect::<Result<Vec<_>>>()?;
        // The cache as tensors over borrowed buffers: the host keeps owning them.
        let mut c = ExpertCache::default();
        for t in cache {
            if t.offset != 0 {
                return Err(EngineError::Other("cache tensors are whole tensors (offset 0)".into()));
            }
            let (dims, dtype) = parts(t)?;
            c.tensors
                .push(Tensor::from_buffer(be.borrow(t, "cache")?, dims, dtype)?);
        }
        expert.backward(
            &be,
            view_mut(&dx_b, dx)?,
            &mut dparam_v,
            view(&dout_b, dout)?,
            &c,
            view(&x_b, x)?,
            &param_v,
            offsets(offs, n_offsets)?,
            d,
        )
    })
}
