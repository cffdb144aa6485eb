//! The op trait every plugin implements, and the registry plugins fill.

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Fact, IrError, Tensor};

/// A typed operation. Ops are created by the ONNX importer (through [`OnnxBuilder`]s) or
/// decoded from an artifact (through [`PersistentOp`]); after that, nothing looks at strings.
pub trait Op: Debug + Send + Sync + Any {
    /// Stable name of the op kind, used in artifacts and messages.
    fn kind(&self) -> &'static str;

    /// Output facts from input facts. Operands that describe shapes (a Reshape target, Slice
    /// bounds, axes) must have constant facts by the time this runs.
    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError>;

    /// Computes the outputs in clear.
    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError>;

    /// Whether, for these input facts, the op returns its first input unchanged (a cast to
    /// the same type, a reduction over no axis); specialization then skips it.
    fn is_identity(&self, _inputs: &[&Fact]) -> bool {
        false
    }

    /// Outputs known without running the op, from input facts alone (e.g. `Shape`).
    fn fold(&self, _inputs: &[&Fact]) -> Option<Vec<Tensor>> {
        None
    }

    /// The op's parameters for artifacts, decoded again by the registry.
    fn params(&self) -> serde_json::Value;

    /// Where the op runs. Only the apply stage of a server call runs on the server.
    fn placement(&self) -> crate::Placement {
        crate::Placement::Client
    }

    /// The op's part in a server call, if it is one: the executor hands such nodes to a
    /// linear backend instead of calling `eval`.
    fn linear_call(&self) -> Option<crate::LinearCall> {
        None
    }

    /// Adds to `g` the nodes computing this node's input gradients from its output
    /// gradients. Returns one entry per input: `None` where no gradient flows or none is
    /// needed (`g.needs_grad(i)` is false).
    fn gradient(&self, g: &mut crate::GradBuilder) -> Result<Vec<Option<crate::OutletId>>, IrError> {
        let _ = g;
        Err(IrError::Invalid(format!("op `{}` has no gradient rule", self.kind())))
    }

    fn as_any(&self) -> &dyn Any;
}

/// An op that can be written to an artifact and read back.
pub trait PersistentOp: Op + Serialize + DeserializeOwned {
    const KIND: &'static str;
}

/// Implements the boilerplate parts of [`Op`] for a [`PersistentOp`] type.
#[macro_export]
macro_rules! persistent_op {
    ($ty:ty, $kind:literal) => {
        impl $crate::PersistentOp for $ty {
            const KIND: &'static str = $kind;
        }
    };
}

/// Writes the `kind`, `params` and `as_any` methods of an `Op` impl for a persistent op.
#[macro_export]
macro_rules! op_common {
    () => {
        fn kind(&self) -> &'static str {
            <Self as $crate::PersistentOp>::KIND
        }
        fn params(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("op params are plain data")
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    };
}

/// One ONNX attribute value, converted at the import boundary.
#[derive(Clone, Debug)]
pub enum AttrValue {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    String(String),
    Tensor(Tensor),
}

/// What a builder knows about the ONNX node it turns into an op.
#[derive(Debug)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub opset: i64,
    pub attributes: HashMap<String, AttrValue>,
    pub n_inputs: usize,
    pub n_outputs: usize,
}

impl OnnxNode {
    fn bad(&self, what: String) -> IrError {
        IrError::Attribute { node: self.name.clone(), op_type: self.op_type.clone(), what }
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, IrError> {
        match self.attributes.get(name) {
            None => Ok(None),
            Some(AttrValue::Int(v)) => Ok(Some(*v)),
            Some(other) => Err(self.bad(format!("attribute `{name}` must be an int, found {other:?}"))),
        }
    }

    pub fn float(&self, name: &str) -> Result<Option<f32>, IrError> {
        match self.attributes.get(name) {
            None => Ok(None),
            Some(AttrValue::Float(v)) => Ok(Some(*v)),
            Some(other) => Err(self.bad(format!("attribute `{name}` must be a float, found {other:?}"))),
        }
    }

    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, IrError> {
        match self.attributes.get(name) {
            None => Ok(None),
            Some(AttrValue::Ints(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.bad(format!("attribute `{name}` must be ints, found {other:?}"))),
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Option<&Tensor>, IrError> {
        match self.attributes.get(name) {
            None => Ok(None),
            Some(AttrValue::Tensor(t)) => Ok(Some(t)),
            Some(other) => Err(self.bad(format!("attribute `{name}` must be a tensor, found {other:?}"))),
        }
    }

    /// An error about this node that names it.
    pub fn error(&self, what: impl Into<String>) -> IrError {
        self.bad(what.into())
    }
}

/// Turns one ONNX node into an op.
pub type OnnxBuilder = fn(&OnnxNode) -> Result<Arc<dyn Op>, IrError>;
type Decoder = fn(serde_json::Value) -> Result<Arc<dyn Op>, serde_json::Error>;

fn decode<T: PersistentOp>(params: serde_json::Value) -> Result<Arc<dyn Op>, serde_json::Error> {
    Ok(Arc::new(serde_json::from_value::<T>(params)?))
}

/// Everything plugins contribute. Filled explicitly by each plugin's `register_all`.
#[derive(Default)]
pub struct Registry {
    onnx: HashMap<&'static str, OnnxBuilder>,
    decoders: HashMap<&'static str, Decoder>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Makes op kind `T` loadable from artifacts.
    pub fn register_op<T: PersistentOp>(&mut self) {
        self.decoders.insert(T::KIND, decode::<T>);
    }

    /// Imports ONNX nodes of `op_type` with `builder`.
    pub fn register_onnx(&mut self, op_type: &'static str, builder: OnnxBuilder) {
        self.onnx.insert(op_type, builder);
    }

    pub fn onnx_builder(&self, op_type: &str) -> Option<OnnxBuilder> {
        self.onnx.get(op_type).copied()
    }

    pub fn onnx_op_types(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.onnx.keys().copied().collect();
        names.sort_unstable();
        names
    }

    pub fn decode_op(&self, kind: &str, params: serde_json::Value) -> Result<Arc<dyn Op>, IrError> {
        let decoder = self.decoders.get(kind).ok_or_else(|| {
            IrError::Invalid(format!(
                "op kind `{kind}` is not registered; the artifact was made by a build with other plugins"
            ))
        })?;
        decoder(params).map_err(|e| IrError::Invalid(format!("bad parameters for op `{kind}`: {e}")))
    }
}
