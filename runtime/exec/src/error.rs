use fhe_ir::IrError;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error("missing input `{name}` (expected {expected})")]
    MissingInput { name: String, expected: String },
    #[error("unknown input `{name}`; the model's inputs are {known:?}")]
    UnknownInput { name: String, known: Vec<String> },
    #[error("input `{name}` is {found}, the model expects {expected}")]
    InputType { name: String, expected: String, found: String },
    #[error("cannot access `{path}`: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("`{path}` is not a valid safetensors file: {what}")]
    Safetensors { path: String, what: String },
    #[error("linear backend: {0}")]
    Backend(String),
    #[error("the graph calls the server ({0}) but no linear backend was given")]
    NoBackend(String),
    #[error("artifact `{dir}`: {what}")]
    Artifact { dir: String, what: String },
}
