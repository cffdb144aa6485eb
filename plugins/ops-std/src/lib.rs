//! fhe-ops-std: the standard op set, everything a GPT-2 ONNX export uses, with shape rules
//! and clear f32 kernels. `register_all` adds the ops and their ONNX builders to a registry.

mod elementwise;
mod gelu;
mod grad_ops;
mod linalg;
mod loss;
mod movement;
mod norm;
mod onnx;
mod rules;
mod util;

pub use elementwise::{Binary, BinaryFn, Cast, Compare, CompareFn, Unary, UnaryFn, Where};
pub use gelu::{Gelu, GeluGrad, GELU_CUBIC, GELU_SQRT_2_OVER_PI};
pub use grad_ops::{sum_to_shape, LayerNormGrad, ReduceMeanGrad, SoftmaxGrad, SumToShapeOf};
pub use linalg::{matmul, Gemm, MatMul};
pub use loss::{CrossEntropy, CrossEntropyGrad, ProjectedCrossEntropy, IGNORE_INDEX};
pub use movement::{
    Concat, ConstantOfShape, Expand, Gather, Range, Reshape, Scalar, ShapeOf, SliceOp, Split, Squeeze, Transpose, Unsqueeze,
};
pub use norm::{LayerNorm, ReduceMean, Softmax};

use fhe_ir::Registry;

/// Registers every op of this plugin: artifact decoders and ONNX builders.
pub fn register_all(registry: &mut Registry) {
    registry.register_op::<Binary>();
    registry.register_op::<Compare>();
    registry.register_op::<Unary>();
    registry.register_op::<Where>();
    registry.register_op::<Cast>();
    registry.register_op::<ShapeOf>();
    registry.register_op::<Reshape>();
    registry.register_op::<Squeeze>();
    registry.register_op::<Unsqueeze>();
    registry.register_op::<Concat>();
    registry.register_op::<SliceOp>();
    registry.register_op::<Gather>();
    registry.register_op::<Transpose>();
    registry.register_op::<Split>();
    registry.register_op::<Expand>();
    registry.register_op::<ConstantOfShape>();
    registry.register_op::<Range>();
    registry.register_op::<MatMul>();
    registry.register_op::<Gemm>();
    registry.register_op::<Softmax>();
    registry.register_op::<LayerNorm>();
    registry.register_op::<ReduceMean>();
    registry.register_op::<SumToShapeOf>();
    registry.register_op::<SoftmaxGrad>();
    registry.register_op::<LayerNormGrad>();
    registry.register_op::<ReduceMeanGrad>();
    registry.register_op::<CrossEntropy>();
    registry.register_op::<CrossEntropyGrad>();
    registry.register_op::<ProjectedCrossEntropy>();
    registry.register_op::<Gelu>();
    registry.register_op::<GeluGrad>();
    onnx::register_builders(registry);
}
