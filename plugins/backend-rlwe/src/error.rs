/// Everything the FHE backend can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum RlweError {
    #[error("client key `{path}`: {what}")]
    Key { path: String, what: String },
    #[error("malformed message: {0}")]
    Wire(String),
    #[error("unknown layer {0}; the server's layers are 0 to {1}")]
    UnknownLayer(u32, usize),
    #[error("{0}")]
    Shape(String),
}
