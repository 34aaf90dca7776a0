//! Experts from a plugin. The host lends the expert its backend for each call
//! (the export-side backend table over `&dyn Backend`), passes its tensors as
//! descriptors of its own buffers, and takes the tensors the expert caches
//! back as host tensors ([`TensorSink`]), so `ExpertCache` stays a plain list.

use super::{create_instance, slot, spec_of, Call, Table};
use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::expert::{Expert, ExpertCache, ParamShape};
use crate::param::{Init, Layout};
use crate::plugin::abi::*;
use crate::plugin::export::backend::{desc_of, desc_ref, Lent};
use crate::plugin::export::guard;
use crate::registry::{ComponentInfo, Registry};
use crate::tensor::{Tensor, TensorMut, TensorRef};
use serde_json::Value;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex};

/// The slots an expert table must fill (all of them).
pub(crate) fn missing_slots(vt: &ExpertVtable) -> Vec<String> {
    super::missing_slots(&[
        ("create", vt.create.is_some()),
        ("destroy", vt.destroy.is_some()),
        ("hidden", vt.hidden.is_some()),
        ("flops_per_token", vt.flops_per_token.is_some()),
        ("param_shapes", vt.param_shapes.is_some()),
        ("forward", vt.forward.is_some()),
        ("backward", vt.backward.is_some()),
    ])
}

/// Registers one checked expert kind.
pub(crate) fn register(
    registry: &mut Registry,
    info: ComponentInfo,
    vt: Table<ExpertVtable>,
    plugin: Arc<str>,
) -> Result<()> {
    let kind = info.kind.clone();
    registry.register_expert(
        info,
        Arc::new(move |params| {
            let vt = vt.get();
            let handle = create_instance(&plugin, "expert", &kind, vt.create, vt.ctx, params)?;
            Ok(Box::new(PluginExpert {
                vt,
                handle,
                plugin: plugin.clone(),
                kind: kind.clone(),
                spec: spec_of(&kind, params),
            }) as Box<dyn Expert>)
        }),
    )
}

/// An expert living in a plugin.
struct PluginExpert {
    vt: ExpertVtable,
    handle: *mut c_void,
    plugin: Arc<str>,
    kind: String,
    spec: Value,
}

// SAFETY: the ABI requires instance handles to be usable from any thread.
unsafe impl Send for PluginExpert {}
unsafe impl Sync for PluginExpert {}

impl Drop for PluginExpert {
    fn drop(&mut self) {
        if let Some(destroy) = self.vt.destroy {
            // SAFETY: the handle came from this table's `create`, dropped once.
            unsafe { destroy(self.handle) }
        }
    }
}

/// Reads the JSON form of a parameter list (see [`ExpertVtable::param_shapes`]).
pub(crate) fn param_shapes_from_json(v: &Value) -> std::result::Result<Vec<ParamShape>, String> {
    let list = v.as_array().ok_or("not a JSON array")?;
    list.iter()
        .map(|p| {
            let name = p["name"]
                .as_str()
                .ok_or("a parameter without a string name")?
                .to_string();
            let shape = p["shape"]
                .as_array()
                .and_then(|s| {
                    s.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| format!("'{name}': shape is not a list of sizes"))?;
            let layout = match &p["layout"] {
                Value::Null => Layout::AsStored,
                Value::String(s) if s == "as_stored" => Layout::AsStored,
                Value::String(s) if s == "input_major" => Layout::InputMajor,
                Value::Object(o) if o.get("input_major_chunks").and_then(Value::as_u64).is_some() => {
                    Layout::InputMajorChunks(o["input_major_chunks"].as_u64().unwrap_or(1) as usize)
                }
                other => {
                    return Err(format!(
                        "'{name}': unknown layout {other} (known: \"as_stored\", \"input_major\", \
                         {{\"input_major_chunks\": k}})"
                    ))
                }
            };
            let init = match &p["init"] {
                Value::String(s) if s == "zeros" => Init::Zeros,
                Value::String(s) if s == "ones" => Init::Ones,
                Value::String(s) if s == "fixed" => Init::Fixed,
                Value::Object(o) if o.contains_key("normal") => Init::Normal(
                    o["normal"]
                        .as_f64()
                        .ok_or_else(|| format!("'{name}': normal std is not a number"))? as f32,
                ),
                Value::Object(o) if o.contains_key("xavier_uniform") => {
                    let f = o["xavier_uniform"].as_array().filter(|f| f.len() == 2);
                    let fan = |i: usize| f.and_then(|f| f[i].as_u64()).map(|x| x as usize);
                    match (fan(0), fan(1)) {
                        (Some(fan_in), Some(fan_out)) => Init::XavierUniform { fan_in, fan_out },
                        _ => return Err(format!("'{name}': xavier_uniform needs [fan_in, fan_out]")),
                    }
                }
                other => {
                    return Err(format!(
                        "'{name}': unknown init {other} (known: \"zeros\", \"ones\", \"fixed\", {{\"normal\": std}}, \
                         {{\"xavier_uniform\": [fan_in, fan_out]}})"
                    ))
                }
            };
            Ok(ParamShape {
                name,
                shape,
                layout,
                init,
            })
        })
        .collect()
}

/// The most bytes of parameter-list JSON taken from a plugin.
const MAX_PARAM_SHAPES_JSON: usize = 16 << 20;

/// Collects the tensors an expert's forward hands back for its cache; the
/// plugin may push from any of its threads during the call, hence the lock.
struct Sink<'l, 'b> {
    lent: &'l Lent<'b>,
    tensors: Mutex<Vec<Tensor>>,
}

unsafe extern "C" fn sink_push(ctx: *mut c_void, t: *const TensorDesc, err: *mut ErrBuf) -> i32 {
    guard(err, || {
        let sink = (ctx as *const Sink)
            .as_ref()
            .ok_or_else(|| EngineError::Other("null sink".into()))?;
        let t = t.as_ref().ok_or_else(|| EngineError::Other("null tensor".into()))?;
        let tensor = sink.lent.take(t)?;
        sink.tensors.lock().unwrap_or_else(|e| e.into_inner()).push(tensor);
        Ok(())
    })
}

impl PluginExpert {
    fn what(&self, op: &str) -> String {
        format!("expert '{}' {op}", self.kind)
    }

    fn param_shapes_checked(&self, d: usize, experts: usize) -> Result<Vec<ParamShape>> {
        let f = slot(self.vt.param_shapes, &self.plugin, "param_shapes")?;
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            let (mut call, mut len) = (Call::new(), 0usize);
            let mut err = call.err();
            // SAFETY: per the ABI; `buf` outlives the call.
            let status = unsafe {
                f(
                    self.handle,
                    d,
                    experts,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                    &mut len,
                    &mut err,
                )
            };
            call.check(status, &self.plugin, self.what("param_shapes"))?;
            if len <= buf.len() {
                let bad = |r: String| EngineError::Plugin {
                    plugin: self.plugin.to_string(),
                    reason: format!("{}: {r}", self.what("param_shapes")),
                };
                let v: Value = serde_json::from_slice(&buf[..len]).map_err(|e| bad(e.to_string()))?;
                return param_shapes_from_json(&v).map_err(bad);
            }
            if len > MAX_PARAM_SHAPES_JSON {
                return Err(EngineError::Plugin {
                    plugin: self.plugin.to_string(),
                    reason: format!(
                        "{}: a parameter list of {len} bytes (at most {MAX_PARAM_SHAPES_JSON} are accepted)",
                        self.what("param_shapes")
                    ),
                });
            }
            buf.resize(len, 0);
        }
        Err(EngineError::Plugin {
            plugin: self.plugin.to_string(),
            reason: format!("{}: the length changed between two calls", self.what("param_shapes")),
        })
    }
}

fn desc_mut(t: &TensorMut<'_>) -> TensorDesc {
    desc_of(t.buffer(), t.offset(), t.shape(), t.dtype())
}

impl Expert for PluginExpert {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn spec(&self) -> Value {
        self.spec.clone()
    }

    fn hidden(&self, d: usize) -> usize {
        // SAFETY: a required slot (checked at load).
        self.vt.hidden.map_or(0, |f| unsafe { f(self.handle, d) })
    }

    fn param_shapes(&self, d: usize, experts: usize) -> Vec<ParamShape> {
        // The trait has no error path here; a bad list shows up as a model
        // without these parameters, and the log says why.
        self.param_shapes_checked(d, experts).unwrap_or_else(|e| {
            tracing::error!("{e}");
            Vec::new()
        })
    }

    fn flops_per_token(&self, d: usize) -> f64 {
        // SAFETY: a required slot (checked at load).
        self.vt
            .flops_per_token
            .map_or(f64::NAN, |f| unsafe { f(self.handle, d) })
    }

    fn forward(
        &self,
        backend: &dyn Backend,
        out: TensorMut<'_>,
        cache: &mut ExpertCache,
        keep: bool,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        let f = slot(self.vt.forward, &self.plugin, "forward")?;
        let lent = Lent::new(backend);
        let bref = lent.as_ref();
        let (out_d, x_d) = (desc_mut(&out), desc_ref(x));
        let params_d: Vec<TensorDesc> = params.iter().map(|p| desc_ref(*p)).collect();
        let mut sink = Sink {
            lent: &lent,
            tensors: Mutex::new(Vec::new()),
        };
        let abi_sink = TensorSink {
            ctx: &sink as *const Sink as *mut c_void,
            push: Some(sink_push),
        };
        // Without `keep` the plugin gets no sink and keeps its scratch to itself.
        let sink_ptr = if keep {
            &abi_sink as *const TensorSink
        } else {
            std::ptr::null()
        };
        let mut call = Call::new();
        let mut err = call.err();
        // SAFETY: per the ABI; every descriptor, the lent backend and the sink outlive the call.
        let status = unsafe {
            f(
                self.handle,
                &bref,
                &out_d,
                sink_ptr,
                &x_d,
                params_d.as_ptr(),
                params_d.len(),
                offsets.as_ptr(),
                offsets.len(),
                d,
                &mut err,
            )
        };
        call.check(status, &self.plugin, self.what("forward"))?;
        if keep {
            cache.tensors.clear();
            cache
                .tensors
                .append(sink.tensors.get_mut().unwrap_or_else(|e| e.into_inner()));
        }
        Ok(())
    }

    fn backward(
        &self,
        backend: &dyn Backend,
        dx: TensorMut<'_>,
        dparams: &mut [TensorMut<'_>],
        dout: TensorRef<'_>,
        cache: &ExpertCache,
        x: TensorRef<'_>,
        params: &[TensorRef<'_>],
        offsets: &[usize],
        d: usize,
    ) -> Result<()> {
        let f = slot(self.vt.backward, &self.plugin, "backward")?;
        let lent = Lent::new(backend);
        let bref = lent.as_ref();
        let (dx_d, dout_d, x_d) = (desc_mut(&dx), desc_ref(dout), desc_ref(x));
        let dparams_d: Vec<TensorDesc> = dparams.iter().map(desc_mut).collect();
        let cache_d: Vec<TensorDesc> = cache.tensors.iter().map(|t| desc_ref(t.view())).collect();
        let params_d: Vec<TensorDesc> = params.iter().map(|p| desc_ref(*p)).collect();
        let mut call = Call::new();
        let mut err = call.err();
        // SAFETY: per the ABI; every descriptor and the lent backend outlive the call.
        let status = unsafe {
            f(
                self.handle,
                &bref,
                &dx_d,
                dparams_d.as_ptr(),
                dparams_d.len(),
                &dout_d,
                cache_d.as_ptr(),
                cache_d.len(),
                &x_d,
                params_d.as_ptr(),
                params_d.len(),
                offsets.as_ptr(),
                offsets.len(),
                d,
                &mut err,
            )
        };
        call.check(status, &self.plugin, self.what("backward"))
    }
}
