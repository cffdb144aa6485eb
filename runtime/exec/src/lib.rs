//! fhe-exec: runs fhe-ir graphs in clear and reads and writes compiled artifacts.

pub mod artifact;
mod backend;
mod error;
mod plan;
pub mod tensor_io;

pub use backend::{unseal, LinearBackend, Sealed};
pub use error::ExecError;
pub use plan::{stage_key, Model, Plan, Profile, RssPeak};
