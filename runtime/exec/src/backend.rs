//! Linear backends: who computes the frozen layers of a partitioned graph, and how.

use std::any::Any;

use fhe_ir::{LinearCall, Tensor};

use crate::ExecError;

/// A value on its way to or from the server, in the backend's own representation
/// (plain floats, quantized integers, ciphertexts).
pub type Sealed = Box<dyn Any + Send>;

/// The three stages of a server call. `seal` and `open` run on the client; `apply` is the
/// server's work (in process, or a request to a remote server).
pub trait LinearBackend: Send + Sync {
    fn seal(&self, call: LinearCall, x: &Tensor) -> Result<Sealed, ExecError>;
    fn apply(&self, call: LinearCall, sealed: Sealed) -> Result<Sealed, ExecError>;
    fn open(&self, call: LinearCall, sealed: Sealed) -> Result<Tensor, ExecError>;
}

/// Downcasts a sealed value, or says which backend mix-up happened.
pub fn unseal<T: 'static>(sealed: Sealed, backend: &str) -> Result<Box<T>, ExecError> {
    sealed.downcast::<T>().map_err(|_| ExecError::Backend(format!("{backend}: got a value sealed by another backend")))
}
