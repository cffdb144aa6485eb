//! What is known about a value before running the graph.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{DType, Tensor};

/// A fully known value type: element type, concrete shape and, for values that do not depend
/// on graph inputs, the value itself (so shape subgraphs fold away).
#[derive(Clone, Debug)]
pub struct Fact {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub konst: Option<Arc<Tensor>>,
}

impl Fact {
    pub fn new(dtype: DType, shape: Vec<usize>) -> Fact {
        Fact { dtype, shape, konst: None }
    }

    pub fn constant(value: Arc<Tensor>) -> Fact {
        Fact { dtype: value.dtype(), shape: value.shape().to_vec(), konst: Some(value) }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

/// One dimension of a graph input as declared by the model: fixed, or named and chosen
/// when the graph is specialized (`batch`, `sequence`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    Fixed(usize),
    Dynamic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(name) => f.write_str(name),
        }
    }
}

/// The declared type of a graph input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl InputSpec {
    /// Whether a concrete shape is allowed for this input.
    pub fn accepts(&self, shape: &[usize]) -> bool {
        shape.len() == self.dims.len()
            && self.dims.iter().zip(shape).all(|(d, &n)| match d {
                Dim::Fixed(f) => *f == n,
                Dim::Dynamic(_) => true,
            })
    }
}

impl fmt::Display for InputSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(ToString::to_string).collect();
        write!(f, "{}[{}]", self.dtype, dims.join(", "))
    }
}
