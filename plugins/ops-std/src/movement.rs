//! Ops that move or describe data without arithmetic: shapes, reshapes, slicing, gathering.

use fhe_ir::broadcast::{broadcast_shapes, normalize_axis};
use fhe_ir::{dispatch_tensor, invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use serde::{Deserialize, Serialize};

use crate::util::{arity, konst, normalize_axes, reshape_tensor};

/// `Shape(x)[start..end]` as i64; known as soon as the input's shape is.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShapeOf {
    pub start: i64,
    pub end: Option<i64>,
}
persistent_op!(ShapeOf, "Shape");

impl ShapeOf {
    fn compute(&self, shape: &[usize]) -> Tensor {
        let r = shape.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (start, end) = (clamp(self.start), clamp(self.end.unwrap_or(r)));
        let dims: Vec<i64> = shape[start..end.max(start)].iter().map(|&d| d as i64).collect();
        Tensor::from_i64(&[dims.len()], dims).expect("length matches")
    }
}

impl Op for ShapeOf {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[], "Shape")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![Fact::new(DType::I64, self.compute(&inputs[0].shape).shape().to_vec())])
    }

    fn fold(&self, inputs: &[&Fact]) -> Option<Vec<Tensor>> {
        Some(vec![self.compute(&inputs.first()?.shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![self.compute(inputs[0].shape())])
    }
}

/// ONNX `Reshape`: `0` copies the input dimension (unless `allowzero`), `-1` is inferred.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reshape {
    pub allowzero: bool,
}
persistent_op!(Reshape, "Reshape");

impl Reshape {
    fn target(&self, input: &[usize], spec: &[i64]) -> Result<Vec<usize>, IrError> {
        let mut out = Vec::with_capacity(spec.len());
        let mut infer = None;
        for (i, &d) in spec.iter().enumerate() {
            match d {
                -1 if infer.is_none() => {
                    infer = Some(i);
                    out.push(1);
                }
                0 if !self.allowzero => {
                    out.push(*input.get(i).ok_or_else(|| invalid!("shape {spec:?} copies dimension {i} that the input {input:?} lacks"))?)
                }
                d if d >= 0 => out.push(d as usize),
                _ => return Err(invalid!("bad target shape {spec:?}")),
            }
        }
        let total: usize = input.iter().product();
        if let Some(i) = infer {
            let known: usize = out.iter().product();
            if known == 0 || total % known != 0 {
                return Err(invalid!("cannot reshape {input:?} to {spec:?}"));
            }
            out[i] = total / known;
        }
        if out.iter().product::<usize>() != total {
            return Err(invalid!("cannot reshape {input:?} to {spec:?}"));
        }
        Ok(out)
    }
}

impl Op for Reshape {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::reshape_back(g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        let spec = konst(inputs[1], "shape")?.to_i64_vec()?;
        Ok(vec![Fact::new(inputs[0].dtype, self.target(&inputs[0].shape, &spec)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let shape = self.target(inputs[0].shape(), &inputs[1].to_i64_vec()?)?;
        Ok(vec![reshape_tensor(inputs[0], &shape)?])
    }
}

/// Axes from an attribute (old opsets) or from an optional second operand (opset 13+).
fn axes_operand(attr: &Option<Vec<i64>>, inputs: &[&Fact]) -> Result<Option<Vec<i64>>, IrError> {
    match (attr, inputs.get(1)) {
        (Some(axes), _) => Ok(Some(axes.clone())),
        (None, Some(fact)) => Ok(Some(konst(fact, "axes")?.to_i64_vec()?)),
        (None, None) => Ok(None),
    }
}

fn axes_values(attr: &Option<Vec<i64>>, inputs: &[&Tensor]) -> Result<Option<Vec<i64>>, IrError> {
    match (attr, inputs.get(1)) {
        (Some(axes), _) => Ok(Some(axes.clone())),
        (None, Some(t)) => Ok(Some(t.to_i64_vec()?)),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Squeeze {
    pub axes: Option<Vec<i64>>,
}
persistent_op!(Squeeze, "Squeeze");

fn squeezed(shape: &[usize], axes: Option<Vec<i64>>) -> Result<Vec<usize>, IrError> {
    let axes = match axes {
        Some(axes) => normalize_axes(&axes, shape.len())?,
        None => (0..shape.len()).filter(|&a| shape[a] == 1).collect(),
    };
    if let Some(&a) = axes.iter().find(|&&a| shape[a] != 1) {
        return Err(invalid!("cannot squeeze axis {a} of shape {shape:?}: its size is not 1"));
    }
    Ok(shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect())
}

impl Op for Squeeze {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::reshape_back(g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 2)?;
        Ok(vec![Fact::new(inputs[0].dtype, squeezed(&inputs[0].shape, axes_operand(&self.axes, inputs)?)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 2)?;
        let shape = squeezed(inputs[0].shape(), axes_values(&self.axes, inputs)?)?;
        Ok(vec![reshape_tensor(inputs[0], &shape)?])
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Unsqueeze {
    pub axes: Option<Vec<i64>>,
}
persistent_op!(Unsqueeze, "Unsqueeze");

fn unsqueezed(shape: &[usize], axes: Option<Vec<i64>>) -> Result<Vec<usize>, IrError> {
    let axes = axes.ok_or_else(|| invalid!("Unsqueeze needs axes"))?;
    let rank = shape.len() + axes.len();
    let axes = normalize_axes(&axes, rank)?;
    let mut rest = shape.iter();
    Ok((0..rank).map(|i| if axes.contains(&i) { 1 } else { *rest.next().unwrap() }).collect())
}

impl Op for Unsqueeze {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::reshape_back(g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 2)?;
        Ok(vec![Fact::new(inputs[0].dtype, unsqueezed(&inputs[0].shape, axes_operand(&self.axes, inputs)?)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 2)?;
        let shape = unsqueezed(inputs[0].shape(), axes_values(&self.axes, inputs)?)?;
        Ok(vec![reshape_tensor(inputs[0], &shape)?])
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Concat {
    pub axis: i64,
}
persistent_op!(Concat, "Concat");

impl Concat {
    fn shape(&self, shapes: &[&[usize]]) -> Result<(usize, Vec<usize>), IrError> {
        let first = shapes.first().ok_or_else(|| invalid!("Concat needs at least one operand"))?;
        let axis = normalize_axis(self.axis, first.len())?;
        let mut out = first.to_vec();
        out[axis] = 0;
        for s in shapes {
            let compatible = s.len() == first.len() && (0..s.len()).all(|i| i == axis || s[i] == first[i]);
            if !compatible {
                return Err(invalid!("cannot concatenate shapes {shapes:?} on axis {axis}"));
            }
            out[axis] += s[axis];
        }
        Ok((axis, out))
    }
}

fn concat_arrays<T: Clone>(axis: usize, arrays: &[&ArrayD<T>]) -> Result<ArrayD<T>, IrError> {
    let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(axis), &views).map_err(|e| invalid!("concatenate: {e}"))
}

impl Op for Concat {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &(0..g.n_inputs()).collect::<Vec<_>>(), "Concat")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|f| f.shape.as_slice()).collect();
        let (_, shape) = self.shape(&shapes)?;
        if inputs.iter().any(|f| f.dtype != inputs[0].dtype) {
            return Err(invalid!("operands have different element types"));
        }
        Ok(vec![Fact::new(inputs[0].dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        let (axis, _) = self.shape(&shapes)?;
        let out = match inputs[0] {
            Tensor::F32(_) => Tensor::F32(concat_arrays(axis, &inputs.iter().map(|t| t.as_f32()).collect::<Result<Vec<_>, _>>()?)?),
            Tensor::I64(_) => Tensor::I64(concat_arrays(axis, &inputs.iter().map(|t| t.as_i64()).collect::<Result<Vec<_>, _>>()?)?),
            Tensor::Bool(_) => Tensor::Bool(concat_arrays(axis, &inputs.iter().map(|t| t.as_bool()).collect::<Result<Vec<_>, _>>()?)?),
        };
        Ok(vec![out])
    }
}

/// ONNX `Slice(data, starts, ends, [axes], [steps])` with its clamping rules.
#[derive(Debug, Serialize, Deserialize)]
pub struct SliceOp;
persistent_op!(SliceOp, "Slice");

/// Per axis: the ndarray slice to take and the resulting length.
fn slice_plan(shape: &[usize], operands: &[Vec<i64>]) -> Result<Vec<(usize, Slice, usize)>, IrError> {
    let (starts, ends) = (&operands[0], &operands[1]);
    let axes = match operands.get(2) {
        Some(axes) => normalize_axes(axes, shape.len())?,
        None => (0..starts.len()).collect(),
    };
    let steps = operands.get(3).cloned().unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(invalid!("starts, ends, axes and steps have different lengths"));
    }
    let mut plan = Vec::with_capacity(axes.len());
    for (i, &axis) in axes.iter().enumerate() {
        let dim = shape[axis] as i64;
        let step = steps[i];
        let resolve = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, end) = (resolve(starts[i]), resolve(ends[i]));
        let (slice, len) = if step > 0 {
            let (s, e) = (start.clamp(0, dim), end.clamp(0, dim));
            let len = if e > s { (e - s + step - 1) / step } else { 0 };
            (Slice::new(s as isize, Some(e.max(s) as isize), step as isize), len)
        } else if step < 0 {
            let (s, e) = (start.clamp(0, dim - 1), end.clamp(-1, dim - 1));
            let len = if s > e { (s - e + (-step) - 1) / (-step) } else { 0 };
            // ndarray walks a negative step backwards from the end of [lo, hi).
            let lo = (e + 1).min(s + 1).max(0);
            (Slice::new(lo as isize, Some((s + 1).max(0) as isize), step as isize), len)
        } else {
            return Err(invalid!("slice step 0 on axis {axis}"));
        };
        plan.push((axis, slice, len as usize));
    }
    Ok(plan)
}

fn apply_slice<T: Clone>(a: &ArrayD<T>, plan: &[(usize, Slice, usize)]) -> ArrayD<T> {
    let mut view = a.view();
    for (axis, slice, _) in plan {
        view.slice_axis_inplace(Axis(*axis), *slice);
    }
    view.to_owned()
}

impl Op for SliceOp {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[0], "Slice")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 5)?;
        let names = ["starts", "ends", "axes", "steps"];
        let operands = inputs[1..].iter().zip(names).map(|(f, n)| konst(f, n)?.to_i64_vec()).collect::<Result<Vec<_>, _>>()?;
        let mut shape = inputs[0].shape.clone();
        for (axis, _, len) in slice_plan(&shape.clone(), &operands)? {
            shape[axis] = len;
        }
        Ok(vec![Fact::new(inputs[0].dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 5)?;
        let operands = inputs[1..].iter().map(|t| t.to_i64_vec()).collect::<Result<Vec<_>, _>>()?;
        let plan = slice_plan(inputs[0].shape(), &operands)?;
        Ok(vec![dispatch_tensor!(inputs[0], a => apply_slice(a, &plan))])
    }
}

/// ONNX `Gather(data, indices)` along one axis; negative indices count from the end.
#[derive(Debug, Serialize, Deserialize)]
pub struct Gather {
    pub axis: i64,
}
persistent_op!(Gather, "Gather");

impl Gather {
    fn shape(&self, data: &[usize], indices: &[usize]) -> Result<(usize, Vec<usize>), IrError> {
        let axis = normalize_axis(self.axis, data.len())?;
        let shape = [&data[..axis], indices, &data[axis + 1..]].concat();
        Ok((axis, shape))
    }
}

impl Op for Gather {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[0], "Gather on a trainable table")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        if inputs[1].dtype != DType::I64 {
            return Err(invalid!("indices must be i64, found {}", inputs[1].dtype));
        }
        let (_, shape) = self.shape(&inputs[0].shape, &inputs[1].shape)?;
        Ok(vec![Fact::new(inputs[0].dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let (axis, shape) = self.shape(inputs[0].shape(), inputs[1].shape())?;
        let size = inputs[0].shape()[axis] as i64;
        let indices = inputs[1]
            .as_i64()?
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + size } else { i };
                if (0..size).contains(&j) {
                    Ok(j as usize)
                } else {
                    Err(invalid!("index {i} is out of range for axis {axis} of size {size}"))
                }
            })
            .collect::<Result<Vec<usize>, _>>()?;
        let picked = dispatch_tensor!(inputs[0], a => a.select(Axis(axis), &indices));
        Ok(vec![reshape_tensor(&picked, &shape)?])
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Transpose {
    pub perm: Option<Vec<usize>>,
}
persistent_op!(Transpose, "Transpose");

impl Transpose {
    fn perm(&self, rank: usize) -> Result<Vec<usize>, IrError> {
        let perm = self.perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != (0..rank).collect::<Vec<_>>() {
            return Err(invalid!("{perm:?} is not a permutation of {rank} axes"));
        }
        Ok(perm)
    }
}

impl Op for Transpose {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::transpose(self.perm.clone(), g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        let perm = self.perm(inputs[0].rank())?;
        Ok(vec![Fact::new(inputs[0].dtype, perm.iter().map(|&p| inputs[0].shape[p]).collect())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        let perm = self.perm(inputs[0].shape().len())?;
        Ok(vec![dispatch_tensor!(inputs[0], a => a.view().permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned())])
    }
}

/// ONNX `Split`: sizes from an attribute (old opsets), an operand (13+), or equal parts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Split {
    pub axis: i64,
    pub split: Option<Vec<i64>>,
    pub outputs: usize,
}
persistent_op!(Split, "Split");

impl Split {
    fn sizes(&self, shape: &[usize], operand: Option<Vec<i64>>) -> Result<(usize, Vec<usize>), IrError> {
        let axis = normalize_axis(self.axis, shape.len())?;
        let dim = shape[axis];
        let sizes: Vec<usize> = match self.split.clone().or(operand) {
            Some(sizes) => sizes.iter().map(|&s| usize::try_from(s).map_err(|_| invalid!("negative split size {s}"))).collect::<Result<_, _>>()?,
            None => {
                let part = dim.div_ceil(self.outputs.max(1));
                (0..self.outputs).map(|i| part.min(dim.saturating_sub(i * part))).collect()
            }
        };
        if sizes.len() != self.outputs || sizes.iter().sum::<usize>() != dim {
            return Err(invalid!("split sizes {sizes:?} do not divide axis {axis} of size {dim} into {} parts", self.outputs));
        }
        Ok((axis, sizes))
    }
}

impl Op for Split {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::split(self.axis, self.outputs, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 2)?;
        let operand = inputs.get(1).map(|f| konst(f, "split")?.to_i64_vec()).transpose()?;
        let (axis, sizes) = self.sizes(&inputs[0].shape, operand)?;
        Ok(sizes
            .into_iter()
            .map(|s| {
                let mut shape = inputs[0].shape.clone();
                shape[axis] = s;
                Fact::new(inputs[0].dtype, shape)
            })
            .collect())
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 2)?;
        let operand = inputs.get(1).map(|t| t.to_i64_vec()).transpose()?;
        let (axis, sizes) = self.sizes(inputs[0].shape(), operand)?;
        let mut start = 0;
        Ok(sizes
            .into_iter()
            .map(|s| {
                let slice = Slice::from(start..start + s);
                start += s;
                dispatch_tensor!(inputs[0], a => a.slice_axis(Axis(axis), slice).to_owned())
            })
            .collect())
    }
}

/// ONNX `Expand`: broadcast to a shape (bidirectionally, as numpy would).
#[derive(Debug, Serialize, Deserialize)]
pub struct Expand;
persistent_op!(Expand, "Expand");

fn expanded(shape: &[usize], spec: &[i64]) -> Result<Vec<usize>, IrError> {
    let spec: Vec<usize> = spec.iter().map(|&d| usize::try_from(d).map_err(|_| invalid!("negative dimension in {spec:?}"))).collect::<Result<_, _>>()?;
    broadcast_shapes(&[shape, &spec])
}

impl Op for Expand {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[0], "Expand")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        let spec = konst(inputs[1], "shape")?.to_i64_vec()?;
        Ok(vec![Fact::new(inputs[0].dtype, expanded(&inputs[0].shape, &spec)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let shape = IxDyn(&expanded(inputs[0].shape(), &inputs[1].to_i64_vec()?)?);
        Ok(vec![dispatch_tensor!(inputs[0], a => a.broadcast(shape.clone()).expect("shape was broadcast").to_owned())])
    }
}

/// A scalar fill value that serializes plainly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    F32(f32),
    I64(i64),
    Bool(bool),
}

impl Scalar {
    pub fn from_tensor(t: &Tensor) -> Result<Scalar, IrError> {
        if t.len() != 1 {
            return Err(invalid!("expected a one-element value, found shape {:?}", t.shape()));
        }
        Ok(match t {
            Tensor::F32(a) => Scalar::F32(a.iter().copied().next().unwrap()),
            Tensor::I64(a) => Scalar::I64(a.iter().copied().next().unwrap()),
            Tensor::Bool(a) => Scalar::Bool(a.iter().copied().next().unwrap()),
        })
    }

    fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::I64(_) => DType::I64,
            Scalar::Bool(_) => DType::Bool,
        }
    }

    fn fill(self, shape: &[usize]) -> Tensor {
        match self {
            Scalar::F32(v) => Tensor::F32(ArrayD::from_elem(IxDyn(shape), v)),
            Scalar::I64(v) => Tensor::I64(ArrayD::from_elem(IxDyn(shape), v)),
            Scalar::Bool(v) => Tensor::Bool(ArrayD::from_elem(IxDyn(shape), v)),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConstantOfShape {
    pub value: Scalar,
}
persistent_op!(ConstantOfShape, "ConstantOfShape");

fn dims(spec: &[i64]) -> Result<Vec<usize>, IrError> {
    spec.iter().map(|&d| usize::try_from(d).map_err(|_| invalid!("negative dimension in {spec:?}"))).collect()
}

impl Op for ConstantOfShape {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[], "ConstantOfShape")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![Fact::new(self.value.dtype(), dims(&konst(inputs[0], "shape")?.to_i64_vec()?)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![self.value.fill(&dims(&inputs[0].to_i64_vec()?)?)])
    }
}

/// ONNX `Range(start, limit, delta)` of i64 or f32 scalars.
#[derive(Debug, Serialize, Deserialize)]
pub struct Range;
persistent_op!(Range, "Range");

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor, IrError> {
    let scalar_f32 = |t: &Tensor| -> Result<f32, IrError> {
        t.as_f32()?.iter().copied().next().ok_or_else(|| invalid!("empty Range operand"))
    };
    match start.dtype() {
        DType::I64 => {
            let (s, l, d) = (start.to_i64_scalar()?, limit.to_i64_scalar()?, delta.to_i64_scalar()?);
            if d == 0 {
                return Err(invalid!("Range with delta 0"));
            }
            let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
            Tensor::from_i64(&[n], (0..n as i64).map(|i| s + i * d).collect())
        }
        DType::F32 => {
            let (s, l, d) = (scalar_f32(start)?, scalar_f32(limit)?, scalar_f32(delta)?);
            if d == 0.0 {
                return Err(invalid!("Range with delta 0"));
            }
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            Tensor::from_f32(&[n], (0..n).map(|i| s + i as f32 * d).collect())
        }
        DType::Bool => Err(invalid!("Range of bool is not defined")),
    }
}

impl Op for Range {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[], "Range")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 3)?;
        let value = range(konst(inputs[0], "start")?, konst(inputs[1], "limit")?, konst(inputs[2], "delta")?)?;
        Ok(vec![Fact::new(value.dtype(), value.shape().to_vec())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 3)?;
        Ok(vec![range(inputs[0], inputs[1], inputs[2])?])
    }
}
