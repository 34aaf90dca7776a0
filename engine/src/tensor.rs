//! Tensors: a shape and a dtype over a [`Buffer`] a backend allocated, and cheap
//! views of them.
//!
//! [`Tensor`] owns its buffer. [`TensorRef`] (shared) and [`TensorMut`]
//! (exclusive) are views: an element offset plus a shape, contiguous row-major,
//! borrowed from a tensor the way slices borrow from a `Vec`, so the borrow
//! checker keeps writers exclusive. Ops take views, never host slices.
//! Host code reads a view's elements only where the buffer is host memory
//! ([`TensorRef::host`]); everything else goes through the backend's explicit
//! `upload` / `download` (see [`crate::transfer`]).
//!
//! [`HostTensor`] stays as the host-side value type for inputs and outputs
//! (ndarray conversion); it is not a parameter or activation type.

use crate::buffer::Buffer;
use crate::dtype::{DType, Element};
use crate::error::{EngineError, Result};
use ndarray::{ArrayD, IxDyn};
use std::marker::PhantomData;

/// Most dimensions a tensor may have.
pub const MAX_RANK: usize = 6;

/// A tensor shape of up to [`MAX_RANK`] dimensions, stored inline (views are `Copy`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_RANK],
    rank: usize,
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl Shape {
    /// A shape from its dimensions; errors above [`MAX_RANK`] or when the
    /// element count overflows.
    pub fn new(dims: &[usize]) -> Result<Self> {
        if dims.len() > MAX_RANK {
            return Err(EngineError::shape(
                "Shape::new",
                format!("at most {MAX_RANK} dimensions"),
                format!("{dims:?}"),
            ));
        }
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| EngineError::shape("Shape::new", "a size that fits in memory", format!("{dims:?}")))?;
        let mut s = Shape {
            dims: [0; MAX_RANK],
            rank: dims.len(),
        };
        s.dims[..dims.len()].copy_from_slice(dims);
        Ok(s)
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    /// Elements per index of the leading axis (1 for a scalar).
    fn row_len(&self) -> usize {
        self.dims().iter().skip(1).product()
    }
}

/// Bytes of `numel` elements of `dtype`, overflow-checked.
pub fn byte_len(numel: usize, dtype: DType) -> Result<usize> {
    numel
        .checked_mul(dtype.size())
        .ok_or_else(|| EngineError::shape("byte_len", "a size that fits in memory", format!("{numel} x {dtype}")))
}

/// A tensor owning a buffer: shape and dtype over the whole buffer.
#[derive(Debug)]
pub struct Tensor {
    buffer: Buffer,
    shape: Shape,
    dtype: DType,
}

impl Tensor {
    /// A tensor over `buffer`; errors when the buffer is smaller than the shape needs.
    pub fn from_buffer(buffer: Buffer, dims: &[usize], dtype: DType) -> Result<Self> {
        let shape = Shape::new(dims)?;
        let need = byte_len(shape.numel(), dtype)?;
        if buffer.len_bytes() < need {
            return Err(EngineError::shape(
                "Tensor::from_buffer",
                format!("{need} bytes for {dims:?} {dtype}"),
                format!("a buffer of {} bytes", buffer.len_bytes()),
            ));
        }
        Ok(Self { buffer, shape, dtype })
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// The buffer (for backends).
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    /// The whole tensor as a shared view.
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef {
            buffer: &self.buffer,
            offset: 0,
            shape: self.shape,
            dtype: self.dtype,
        }
    }

    /// The whole tensor as an exclusive view.
    pub fn view_mut(&mut self) -> TensorMut<'_> {
        TensorMut {
            buffer: &self.buffer,
            offset: 0,
            shape: self.shape,
            dtype: self.dtype,
            _exclusive: PhantomData,
        }
    }

    /// Gives the tensor a new shape of the same element count (no copy).
    pub fn reshape(&mut self, dims: &[usize]) -> Result<()> {
        self.shape = reshaped(self.shape, dims, "Tensor::reshape")?;
        Ok(())
    }
}

fn reshaped(shape: Shape, dims: &[usize], op: &str) -> Result<Shape> {
    let new = Shape::new(dims)?;
    if new.numel() != shape.numel() {
        return Err(EngineError::shape(
            op,
            format!("{} elements", shape.numel()),
            format!("{dims:?}"),
        ));
    }
    Ok(new)
}

fn narrowed(shape: Shape, start: usize, len: usize, op: &str) -> Result<(usize, Shape)> {
    let lead = shape.dims().first().copied().unwrap_or(1);
    if shape.rank == 0 || start.checked_add(len).is_none_or(|end| end > lead) {
        return Err(EngineError::shape(
            op,
            format!("rows within 0..{lead} of {:?}", shape.dims()),
            format!("{start}..{}", start.saturating_add(len)),
        ));
    }
    let mut s = shape;
    s.dims[0] = len;
    Ok((start * shape.row_len(), s))
}

/// A shared view: offset (in elements) and shape over a buffer.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    buffer: &'a Buffer,
    offset: usize,
    shape: Shape,
    dtype: DType,
}

/// An exclusive view: like [`TensorRef`], and no other view of its elements
/// exists while it lives.
#[derive(Debug)]
pub struct TensorMut<'a> {
    buffer: &'a Buffer,
    offset: usize,
    shape: Shape,
    dtype: DType,
    _exclusive: PhantomData<&'a mut Buffer>,
}

macro_rules! view_accessors {
    () => {
        /// The dimensions.
        pub fn shape(&self) -> &[usize] {
            self.shape.dims()
        }
        /// The storage dtype.
        pub fn dtype(&self) -> DType {
            self.dtype
        }
        /// Number of elements.
        pub fn numel(&self) -> usize {
            self.shape.numel()
        }
        /// Offset of the first element in the buffer, in elements.
        pub fn offset(&self) -> usize {
            self.offset
        }
        /// Offset of the first element in the buffer, in bytes.
        pub fn byte_offset(&self) -> usize {
            self.offset * self.dtype.size()
        }
        /// Bytes the view covers.
        pub fn byte_len(&self) -> usize {
            self.numel() * self.dtype.size()
        }
        /// The buffer (for backends).
        pub fn buffer(&self) -> &'a Buffer {
            self.buffer
        }
        /// Errors unless the dtype is `want`, naming `op` and `what`.
        pub fn expect_dtype(&self, op: &str, what: &str, want: DType) -> Result<()> {
            if self.dtype != want {
                return Err(EngineError::shape(
                    format!("{op} ({what} dtype)"),
                    want,
                    self.dtype,
                ));
            }
            Ok(())
        }
        /// Errors unless the view has `want` elements, naming `op` and `what`.
        pub fn expect_len(&self, op: &str, what: &str, want: usize) -> Result<()> {
            crate::error::check_len(op, what, self.numel(), want)
        }
    };
}

impl<'a> TensorRef<'a> {
    view_accessors!();

    /// Rows `start..start + len` of the leading axis.
    pub fn rows(self, start: usize, len: usize) -> Result<TensorRef<'a>> {
        let (off, shape) = narrowed(self.shape, start, len, "TensorRef::rows")?;
        Ok(TensorRef {
            offset: self.offset + off,
            shape,
            ..self
        })
    }

    /// The same elements under another shape.
    pub fn reshape(self, dims: &[usize]) -> Result<TensorRef<'a>> {
        Ok(TensorRef {
            shape: reshaped(self.shape, dims, "TensorRef::reshape")?,
            ..self
        })
    }

    /// Elements `start..start + len` as a 1-D view.
    pub fn flat(self, start: usize, len: usize) -> Result<TensorRef<'a>> {
        self.reshape(&[self.numel()])?.rows(start, len)
    }

    /// The elements as a host slice, without a copy. Errors when the buffer is
    /// not host memory (use a transfer) or `T` is not the view's dtype.
    pub fn host<T: Element>(self) -> Result<&'a [T]> {
        let ptr = host_base::<T>(self.buffer, self.dtype, self.offset, "TensorRef::host")?;
        // SAFETY: the buffer holds at least offset + numel elements (checked when
        // the tensor was made and narrowed); a shared view guarantees no writer.
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.numel()) })
    }

    /// A view from raw parts, for backends that wrap another backend's storage
    /// (the transfer-counting test backend).
    ///
    /// # Safety
    /// `buffer` must hold `offset + numel` elements of `dtype`, and no exclusive
    /// view of these elements may live as long as the result.
    pub unsafe fn from_raw_parts(buffer: &'a Buffer, offset: usize, dims: &[usize], dtype: DType) -> Result<Self> {
        Ok(TensorRef {
            buffer,
            offset,
            shape: Shape::new(dims)?,
            dtype,
        })
    }
}

impl<'a> TensorMut<'a> {
    view_accessors!();

    /// A shorter-lived exclusive view of the same elements.
    pub fn reborrow(&mut self) -> TensorMut<'_> {
        TensorMut {
            buffer: self.buffer,
            offset: self.offset,
            shape: self.shape,
            dtype: self.dtype,
            _exclusive: PhantomData,
        }
    }

    /// A shared view of the same elements, for as long as `self` is borrowed.
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef {
            buffer: self.buffer,
            offset: self.offset,
            shape: self.shape,
            dtype: self.dtype,
        }
    }

    /// Rows `start..start + len` of the leading axis.
    pub fn rows(self, start: usize, len: usize) -> Result<TensorMut<'a>> {
        let (off, shape) = narrowed(self.shape, start, len, "TensorMut::rows")?;
        Ok(TensorMut {
            offset: self.offset + off,
            shape,
            ..self
        })
    }

    /// The same elements under another shape.
    pub fn reshape(self, dims: &[usize]) -> Result<TensorMut<'a>> {
        let shape = reshaped(self.shape, dims, "TensorMut::reshape")?;
        Ok(TensorMut { shape, ..self })
    }

    /// Elements `start..start + len` as a 1-D view.
    pub fn flat(self, start: usize, len: usize) -> Result<TensorMut<'a>> {
        let n = self.numel();
        self.reshape(&[n])?.rows(start, len)
    }

    /// Splits the leading axis at `mid` into two disjoint exclusive views.
    pub fn split_rows(self, mid: usize) -> Result<(TensorMut<'a>, TensorMut<'a>)> {
        let lead = self.shape.dims().first().copied().unwrap_or(1);
        let (o1, s1) = narrowed(self.shape, 0, mid, "TensorMut::split_rows")?;
        let (o2, s2) = narrowed(self.shape, mid, lead - mid, "TensorMut::split_rows")?;
        let part = |off: usize, shape: Shape| TensorMut {
            buffer: self.buffer,
            offset: self.offset + off,
            shape,
            dtype: self.dtype,
            _exclusive: PhantomData,
        };
        Ok((part(o1, s1), part(o2, s2)))
    }

    /// The elements as a mutable host slice, without a copy. Errors when the
    /// buffer is not host memory or `T` is not the view's dtype.
    pub fn host_mut<T: Element>(self) -> Result<&'a mut [T]> {
        let ptr = host_base::<T>(self.buffer, self.dtype, self.offset, "TensorMut::host_mut")?;
        self.buffer.note_write();
        // SAFETY: as in `TensorRef::host`, and the view is exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, self.numel()) })
    }

    /// An exclusive view from raw parts (see [`TensorRef::from_raw_parts`]).
    ///
    /// # Safety
    /// `buffer` must hold `offset + numel` elements of `dtype`, and no other view
    /// of these elements may live as long as the result.
    pub unsafe fn from_raw_parts(buffer: &'a Buffer, offset: usize, dims: &[usize], dtype: DType) -> Result<Self> {
        Ok(TensorMut {
            buffer,
            offset,
            shape: Shape::new(dims)?,
            dtype,
            _exclusive: PhantomData,
        })
    }
}

fn host_base<T: Element>(buffer: &Buffer, dtype: DType, offset: usize, op: &str) -> Result<*mut T> {
    if T::DTYPE != dtype {
        return Err(EngineError::shape(format!("{op} (dtype)"), T::DTYPE, dtype));
    }
    let base = buffer.storage().host_ptr().ok_or_else(|| EngineError::Backend {
        backend: buffer.backend().into(),
        reason: format!("{op}: the tensor is in device memory; download it first"),
    })?;
    // SAFETY: offset is within the allocation (views are bounds-checked when made).
    Ok(unsafe { base.as_ptr().cast::<T>().add(offset) })
}

/// A dense row-major f32 tensor in host memory: the value type for inputs and
/// outputs crossing into and out of the engine (converts to and from ndarray).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` elements, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from a shape and its data; errors if the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(EngineError::shape(
                "HostTensor::new",
                format!("{n} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Self { shape, data })
    }

    /// All zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Converts to an owned ndarray.
    pub fn to_ndarray(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.data.clone())
            .expect("HostTensor invariant: data length equals shape product")
    }

    /// Converts from any ndarray (any memory order; copied to row-major).
    pub fn from_ndarray<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> Self {
        Self {
            shape: a.shape().to_vec(),
            data: a.iter().copied().collect(),
        }
    }
}

impl<D: ndarray::Dimension> From<ndarray::Array<f32, D>> for HostTensor {
    fn from(a: ndarray::Array<f32, D>) -> Self {
        Self::from_ndarray(&a)
    }
}

impl From<&HostTensor> for ArrayD<f32> {
    fn from(t: &HostTensor) -> Self {
        t.to_ndarray()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::HostStorage;

    fn host_tensor(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let buf = Buffer::new(Box::new(HostStorage::zeroed(n * 4).unwrap()), "host");
        Tensor::from_buffer(buf, dims, DType::F32).unwrap()
    }

    #[test]
    fn views_narrow_split_and_reshape_without_copying() {
        let mut t = host_tensor(&[4, 3]);
        t.view_mut()
            .host_mut::<f32>()
            .unwrap()
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32);
        let rows = t.view().rows(1, 2).unwrap();
        assert_eq!(rows.shape(), &[2, 3]);
        assert_eq!(rows.host::<f32>().unwrap(), &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let (a, b) = t.view_mut().split_rows(1).unwrap();
        a.host_mut::<f32>().unwrap()[0] = -1.0;
        b.reshape(&[9]).unwrap().host_mut::<f32>().unwrap()[8] = -2.0;
        let all = t.view().host::<f32>().unwrap();
        assert_eq!((all[0], all[11]), (-1.0, -2.0));
        assert_eq!(t.view().flat(10, 2).unwrap().host::<f32>().unwrap(), &[10.0, -2.0]);
    }

    #[test]
    fn bad_views_and_dtypes_are_errors() {
        let t = host_tensor(&[4, 3]);
        assert!(t.view().rows(3, 2).is_err());
        assert!(t.view().reshape(&[5, 2]).is_err());
        let err = t.view().host::<u32>().unwrap_err().to_string();
        assert!(err.contains("u32") && err.contains("f32"), "{err}");
        assert!(Shape::new(&[1; 7]).is_err());
        assert!(Shape::new(&[usize::MAX, 2]).is_err());
    }

    #[test]
    fn tensor_refuses_a_short_buffer() {
        let buf = Buffer::new(Box::new(HostStorage::zeroed(8).unwrap()), "host");
        assert!(Tensor::from_buffer(buf, &[3], DType::F32).is_err());
    }

    #[test]
    fn ndarray_round_trip_keeps_row_major_order() {
        let a = ndarray::Array2::from_shape_fn((2, 3), |(i, j)| (i * 10 + j) as f32);
        let t = HostTensor::from(a.clone());
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
        let tt = HostTensor::from_ndarray(&a.t().to_owned());
        assert_eq!(tt.data, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        assert_eq!(t.to_ndarray().into_dimensionality::<ndarray::Ix2>().unwrap(), a);
    }
}
