//! fhe-ir: the graph IR every other crate speaks.
//!
//! - [`Tensor`] and [`DType`]: values in clear.
//! - [`Fact`]: what is known of a value before running (type, shape, maybe the value).
//! - [`Op`]: the trait op plugins implement; [`Registry`]: where plugins register.
//! - [`Graph`]: nodes and edges on petgraph, behind typed [`NodeId`]/[`OutletId`].
//! - [`specialize`]: fixes input shapes and folds shape subgraphs into constants.

mod error;
mod fact;
mod grad;
mod graph;
mod op;
mod placement;
mod specialize;
mod tensor;

pub mod broadcast;

pub use error::IrError;
pub use fact::{Dim, Fact, InputSpec};
pub use grad::GradBuilder;
pub use graph::{Graph, GraphOutput, Node, NodeBody, NodeId, OutletId};
pub use placement::{verify_placement, Direction, LayerId, LinearCall, Placement, Stage};
pub use op::{AttrValue, OnnxBuilder, OnnxNode, Op, PersistentOp, Registry};
pub use specialize::{specialize, Specialized};
pub use tensor::{DType, Tensor};
