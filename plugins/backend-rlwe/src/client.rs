//! The client's linear backend: quantize and encrypt (seal), send to a server (apply),
//! decrypt and dequantize (open). Scales and the key never leave this side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhe_backend_clear::{quantize_rows, scale_columns};
use fhe_exec::artifact::ClientArtifact;
use fhe_exec::{unseal, ExecError, LinearBackend, Sealed};
use fhe_ir::{Direction, LayerId, LinearCall, Tensor};
use rayon::prelude::*;

use crate::wire::{decode_response_packed, CallHeader};
use crate::{decrypt_ciphertext, encrypt_request, ClientKey, LinearServer, Setting, POLY_SIZE};

/// How requests reach a server.
pub trait Transport: Send + Sync {
    fn call(&self, layer: LayerId, direction: Direction, body: Vec<u8>) -> Result<Reply, String>;
}

/// A server's answer to one call.
pub struct Reply {
    pub body: Vec<u8>,
    /// The server's own compute time, where it reports it (HTTP `Server-Timing`).
    pub server_time: Option<Duration>,
}

/// A server in this process; still the real encoding and encryption.
pub struct LocalTransport(pub Arc<LinearServer>);

impl Transport for LocalTransport {
    fn call(&self, layer: LayerId, direction: Direction, body: Vec<u8>) -> Result<Reply, String> {
        let started = Instant::now();
        let body = self.0.handle(layer, direction, &body).map_err(|e| e.to_string())?;
        Ok(Reply { body, server_time: Some(started.elapsed()) })
    }
}

/// Bytes sent and received so far, and the compute time servers reported for them.
#[derive(Debug, Default)]
pub struct Traffic {
    pub up: AtomicU64,
    pub down: AtomicU64,
    pub server_nanos: AtomicU64,
}

struct Layer {
    in_features: usize,
    out_features: usize,
    weight_scales: Vec<f32>,
}

pub struct FheBackend {
    key: Arc<ClientKey>,
    setting: Setting,
    layers: HashMap<LayerId, Layer>,
    transport: Arc<dyn Transport>,
    pub traffic: Arc<Traffic>,
}

/// Requests of one call (a block over N tokens is split), with what stays on the client.
struct Pending {
    tokens: usize,
    row_scales: Vec<f32>,
    messages: Vec<Vec<u8>>,
}

/// Output features decrypted per block in `open`: 64 × 2048 tokens × 4 B = 512 KB at a time.
/// (Small enough that the tiny test model's layers span several blocks, partial ones too.)
const OPEN_BLOCK: usize = 64;

fn backend_error(e: impl std::fmt::Display) -> ExecError {
    ExecError::Backend(e.to_string())
}

impl FheBackend {
    pub fn new(key: Arc<ClientKey>, setting: Setting, client: &ClientArtifact, transport: Arc<dyn Transport>) -> FheBackend {
        let layers = client
            .manifest
            .layers
            .iter()
            .filter_map(|l| {
                let scales = client.weight_scales.get(&l.id)?.clone();
                Some((l.id, Layer { in_features: l.in_features, out_features: l.out_features, weight_scales: scales }))
            })
            .collect();
        FheBackend { key, setting, layers, transport, traffic: Arc::default() }
    }

    fn layer(&self, call: LinearCall) -> Result<&Layer, ExecError> {
        self.layers.get(&call.layer).ok_or_else(|| ExecError::Backend(format!("{} is not in the client artifact", call.layer)))
    }
}

impl LinearBackend for FheBackend {
    fn seal(&self, call: LinearCall, x: &Tensor) -> Result<Sealed, ExecError> {
        let layer = self.layer(call)?;
        let cols = if call.direction == Direction::Forward { layer.in_features } else { layer.out_features };
        let shape = x.shape();
        if shape.len() != 2 || shape[1] != cols {
            return Err(ExecError::Backend(format!("{} {} expects [tokens, {cols}], got {shape:?}", call.layer, call.direction)));
        }
        let tokens = shape[0];
        let x = x.as_f32()?.as_standard_layout();
        let mut data = x.as_slice().expect("standard layout");
        let scaled;
        if call.direction == Direction::Backward {
            scaled = scale_columns(data, cols, &layer.weight_scales);
            data = &scaled;
        }
        let q = quantize_rows(data, tokens, cols);
        let header = CallHeader { layer: call.layer, direction: call.direction };
        let messages = q
            .values
            .chunks(POLY_SIZE * cols)
            .map(|chunk| encrypt_request(&self.key, self.setting, header, chunk, chunk.len() / cols, cols).map_err(backend_error))
            .collect::<Result<Vec<_>, ExecError>>()?;
        Ok(Box::new(Pending { tokens, row_scales: q.scales, messages }))
    }

    fn apply(&self, call: LinearCall, sealed: Sealed) -> Result<Sealed, ExecError> {
        let mut pending = unseal::<Pending>(sealed, "fhe backend")?;
        let requests = std::mem::take(&mut pending.messages);
        for request in requests {
            self.traffic.up.fetch_add(request.len() as u64, Ordering::Relaxed);
            let reply = self.transport.call(call.layer, call.direction, request).map_err(|e| ExecError::Backend(format!("server: {e}")))?;
            self.traffic.down.fetch_add(reply.body.len() as u64, Ordering::Relaxed);
            if let Some(time) = reply.server_time {
                self.traffic.server_nanos.fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
            }
            pending.messages.push(reply.body);
        }
        Ok(pending)
    }

    fn open(&self, call: LinearCall, sealed: Sealed) -> Result<Tensor, ExecError> {
        let pending = unseal::<Pending>(sealed, "fhe backend")?;
        let layer = self.layer(call)?;
        let cols = if call.direction == Direction::Forward { layer.out_features } else { layer.in_features };
        let col_scales = (call.direction == Direction::Forward).then_some(layer.weight_scales.as_slice());
        let mut out = vec![0f32; pending.tokens * cols];
        let mut first_token = 0;
        for message in &pending.messages {
            let (header, packed) = decode_response_packed(message).map_err(backend_error)?;
            if header != (CallHeader { layer: call.layer, direction: call.direction }) || packed.outputs != cols {
                return Err(ExecError::Backend(format!("the server answered for {} {} with {} features", header.layer, header.direction, packed.outputs)));
            }
            let tokens = packed.tokens;
            if first_token + tokens > pending.tokens {
                return Err(ExecError::Backend(format!("the server answered more than the {} tokens sent", pending.tokens)));
            }
            // One ciphertext (output feature) at a time, straight from the packed response,
            // dequantized as it is decrypted (y·s_x[t]·s_w[j]), a block of features at a time
            // so only a block is ever held column-major.
            let row_scales = &pending.row_scales[first_token..first_token + tokens];
            let rows = &mut out[first_token * cols..(first_token + tokens) * cols];
            for j0 in (0..cols).step_by(OPEN_BLOCK) {
                let width = OPEN_BLOCK.min(cols - j0);
                let mut block = vec![0f32; width * tokens];
                block.par_chunks_mut(tokens).enumerate().for_each_init(
                    || vec![0i64; tokens],
                    |values, (b, column)| {
                        let (mask, body) = packed.ciphertext(j0 + b);
                        decrypt_ciphertext(&self.key, &mask, &body, packed.setting.output_bits(), values);
                        let cs = col_scales.map_or(1.0, |c| c[j0 + b]);
                        for ((v, &y), &rs) in column.iter_mut().zip(values.iter()).zip(row_scales) {
                            *v = y as f32 * rs * cs;
                        }
                    },
                );
                rows.par_chunks_mut(cols).enumerate().for_each(|(t, row)| {
                    for (b, v) in row[j0..j0 + width].iter_mut().enumerate() {
                        *v = block[b * tokens + t];
                    }
                });
            }
            first_token += tokens;
        }
        if first_token != pending.tokens {
            return Err(ExecError::Backend(format!("the server answered {first_token} tokens of {}", pending.tokens)));
        }
        Ok(Tensor::from_f32(&[pending.tokens, cols], out)?)
    }
}
