use crate::DType;

/// Everything that can go wrong while building, checking or evaluating a graph.
#[derive(Debug, thiserror::Error)]
pub enum IrError {
    #[error("expected a {expected} tensor, found {found}")]
    DType { expected: DType, found: DType },
    #[error("{0}")]
    Invalid(String),
    #[error("node `{node}` ({op_type}): {what}")]
    Attribute { node: String, op_type: String, what: String },
    #[error("node `{node}` ({kind})")]
    Node {
        node: String,
        kind: String,
        #[source]
        source: Box<IrError>,
    },
    #[error("graph input `{name}`: {what}")]
    Input { name: String, what: String },
    #[error("the graph has a cycle through node `{0}`")]
    Cycle(String),
    #[error("the graph is malformed: {0}")]
    Malformed(String),
}

impl IrError {
    /// Wraps an error with the node it happened in.
    pub fn in_node(self, node: &str, kind: &str) -> IrError {
        match self {
            already @ IrError::Node { .. } => already,
            other => IrError::Node { node: node.to_string(), kind: kind.to_string(), source: Box::new(other) },
        }
    }
}

/// Shorthand for an [`IrError::Invalid`] with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::IrError::Invalid(format!($($arg)*)) };
}
