//! fhe-backend-clear: linear backends that compute the server layers in clear.
//!
//! - [`F32Backend`]: the original f32 weights, exactly what the model computes. Used for
//!   `--fhe clear` and to check that partitioning changes nothing.
//! - [`Int8Backend`]: what the FHE backend computes, without encryption: per-token int8
//!   activations (client), int8 weights and exact integer products (server), dequantized on
//!   the client. It is the `simulate` mode and the test oracle for the FHE backend.

mod quant;

use std::collections::HashMap;

use fhe_exec::artifact::ServerArtifact;
use fhe_exec::{unseal, ExecError, LinearBackend, Sealed};
use fhe_ir::{Direction, LayerId, LinearCall, Tensor};
use gemm::Parallelism;

pub use quant::{dequantize, quantize_rows, scale_columns, QuantizedRows, QMAX};

fn rows_of(x: &Tensor, cols: usize) -> Result<(usize, Vec<f32>), ExecError> {
    let shape = x.shape();
    if shape.len() != 2 || shape[1] != cols {
        return Err(ExecError::Backend(format!("expected a [tokens, {cols}] block, got {shape:?}")));
    }
    Ok((shape[0], x.to_f32_vec()?))
}

/// `[rows × k] · M` or `· Mᵀ` for row-major `M` of shape `[m_rows × m_cols]`, in f64 so
/// integer operands below 2^53 multiply exactly.
fn product_f64(x: &[f64], rows: usize, m: &[f64], m_rows: usize, m_cols: usize, transpose: bool) -> Vec<f64> {
    let (k, n) = if transpose { (m_cols, m_rows) } else { (m_rows, m_cols) };
    let mut out = vec![0f64; rows * n];
    let (rs, cs) = if transpose { (1, m_cols as isize) } else { (m_cols as isize, 1) };
    let par = if rows * n * k > 1 << 20 { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: all three buffers have exactly the sizes the strides describe.
    unsafe {
        gemm::gemm(rows, n, k, out.as_mut_ptr(), 1, n as isize, false, x.as_ptr(), 1, k as isize, m.as_ptr(), cs, rs, 0.0, 1.0, false, false, false, par);
    }
    out
}

struct Layer {
    in_features: usize,
    out_features: usize,
    weight: Vec<f64>,
    qweight: Vec<f64>,
    scales: Vec<f32>,
}

fn layer_table(server: &ServerArtifact) -> HashMap<LayerId, Layer> {
    server
        .layers
        .iter()
        .map(|(&id, l)| {
            let layer = Layer {
                in_features: l.entry.in_features,
                out_features: l.entry.out_features,
                weight: l.weight.iter().map(|&v| v as f64).collect(),
                qweight: l.qweight.iter().map(|&v| v as f64).collect(),
                scales: l.scales.clone(),
            };
            (id, layer)
        })
        .collect()
}

fn find<'a>(layers: &'a HashMap<LayerId, Layer>, call: LinearCall) -> Result<&'a Layer, ExecError> {
    layers.get(&call.layer).ok_or_else(|| ExecError::Backend(format!("{} is not in the server artifact", call.layer)))
}

/// Widths of the call's input and output.
fn widths(layer: &Layer, direction: Direction) -> (usize, usize) {
    match direction {
        Direction::Forward => (layer.in_features, layer.out_features),
        Direction::Backward => (layer.out_features, layer.in_features),
    }
}

/// The server layers in f32, exactly as the original model computes them.
pub struct F32Backend {
    layers: HashMap<LayerId, Layer>,
}

impl F32Backend {
    pub fn new(server: &ServerArtifact) -> F32Backend {
        F32Backend { layers: layer_table(server) }
    }
}

struct Plain {
    rows: usize,
    data: Vec<f32>,
}

impl LinearBackend for F32Backend {
    fn seal(&self, call: LinearCall, x: &Tensor) -> Result<Sealed, ExecError> {
        let (cols, _) = widths(find(&self.layers, call)?, call.direction);
        let (rows, data) = rows_of(x, cols)?;
        Ok(Box::new(Plain { rows, data }))
    }

    fn apply(&self, call: LinearCall, sealed: Sealed) -> Result<Sealed, ExecError> {
        let layer = find(&self.layers, call)?;
        let x = unseal::<Plain>(sealed, "f32 backend")?;
        let wide: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
        let backward = call.direction == Direction::Backward;
        let y = product_f64(&wide, x.rows, &layer.weight, layer.in_features, layer.out_features, backward);
        Ok(Box::new(Plain { rows: x.rows, data: y.into_iter().map(|v| v as f32).collect() }))
    }

    fn open(&self, call: LinearCall, sealed: Sealed) -> Result<Tensor, ExecError> {
        let (_, cols) = widths(find(&self.layers, call)?, call.direction);
        let y = unseal::<Plain>(sealed, "f32 backend")?;
        Ok(Tensor::from_f32(&[y.rows, cols], y.data)?)
    }
}

/// The server layers as the FHE backend computes them, in clear integers.
pub struct Int8Backend {
    layers: HashMap<LayerId, Layer>,
}

impl Int8Backend {
    pub fn new(server: &ServerArtifact) -> Int8Backend {
        Int8Backend { layers: layer_table(server) }
    }

    /// Client side: quantizes a block for `call` (backward gradients are first scaled by the
    /// weight scales, see [`scale_columns`]).
    pub fn quantize(&self, call: LinearCall, x: &Tensor) -> Result<QuantizedRows, ExecError> {
        quantize_for(find(&self.layers, call)?, call.direction, x)
    }

    /// Server side: the exact integer product of quantized rows with the int8 weight.
    pub fn integer_product(&self, call: LinearCall, q: &QuantizedRows) -> Result<Vec<i64>, ExecError> {
        let layer = find(&self.layers, call)?;
        let (cols, _) = widths(layer, call.direction);
        if q.cols != cols {
            return Err(ExecError::Backend(format!("{} {} takes {cols} features, got {}", call.layer, call.direction, q.cols)));
        }
        let x: Vec<f64> = q.values.iter().map(|&v| v as f64).collect();
        let backward = call.direction == Direction::Backward;
        Ok(product_f64(&x, q.rows, &layer.qweight, layer.in_features, layer.out_features, backward).into_iter().map(|v| v as i64).collect())
    }

    /// Client side: back to f32 from the integer products.
    pub fn dequantize(&self, call: LinearCall, acc: &[i64], row_scales: &[f32]) -> Result<Tensor, ExecError> {
        let layer = find(&self.layers, call)?;
        let (_, cols) = widths(layer, call.direction);
        let col_scales = (call.direction == Direction::Forward).then_some(layer.scales.as_slice());
        Ok(Tensor::from_f32(&[row_scales.len(), cols], dequantize(acc, row_scales, col_scales, cols))?)
    }
}

fn quantize_for(layer: &Layer, direction: Direction, x: &Tensor) -> Result<QuantizedRows, ExecError> {
    let (cols, _) = widths(layer, direction);
    let (rows, data) = rows_of(x, cols)?;
    let data = match direction {
        Direction::Forward => data,
        Direction::Backward => scale_columns(&data, cols, &layer.scales),
    };
    Ok(quantize_rows(&data, rows, cols))
}

/// What travels in simulation: the quantized block, with the row scales kept beside it
/// (on the client, in the FHE backend).
struct Quantized(QuantizedRows);
struct Products {
    acc: Vec<i64>,
    row_scales: Vec<f32>,
}

impl LinearBackend for Int8Backend {
    fn seal(&self, call: LinearCall, x: &Tensor) -> Result<Sealed, ExecError> {
        Ok(Box::new(Quantized(self.quantize(call, x)?)))
    }

    fn apply(&self, call: LinearCall, sealed: Sealed) -> Result<Sealed, ExecError> {
        let q = unseal::<Quantized>(sealed, "int8 backend")?;
        let acc = self.integer_product(call, &q.0)?;
        Ok(Box::new(Products { acc, row_scales: q.0.scales }))
    }

    fn open(&self, call: LinearCall, sealed: Sealed) -> Result<Tensor, ExecError> {
        let p = unseal::<Products>(sealed, "int8 backend")?;
        self.dequantize(call, &p.acc, &p.row_scales)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use fhe_exec::artifact::{LayerEntry, PartKind, PartManifest, ServerLayer};

    use super::*;

    fn server(rows: usize, cols: usize, qweight: Vec<i8>) -> ServerArtifact {
        let entry = LayerEntry { id: LayerId(0), name: "l".into(), in_features: rows, out_features: cols };
        let manifest = PartManifest {
            format: String::new(),
            format_version: 0,
            part: PartKind::Server,
            model_sha256: String::new(),
            parameter_set: String::new(),
            layers: vec![entry.clone()],
            lora: None,
            files: Default::default(),
        };
        let layer = ServerLayer { entry, weight: qweight.iter().map(|&v| v as f32).collect(), qweight, scales: vec![1.0; cols] };
        ServerArtifact { dir: PathBuf::new(), manifest, layers: HashMap::from([(LayerId(0), layer)]) }
    }

    fn naive(x: &[i8], rows: usize, w: &[i8], n_in: usize, n_out: usize, backward: bool) -> Vec<i64> {
        let (k, n) = if backward { (n_out, n_in) } else { (n_in, n_out) };
        let mut out = vec![0i64; rows * n];
        for t in 0..rows {
            for j in 0..n {
                out[t * n + j] = (0..k)
                    .map(|i| {
                        let wv = if backward { w[j * n_out + i] } else { w[i * n_out + j] };
                        x[t * k + i] as i64 * wv as i64
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn integer_products_are_exact_even_at_the_extremes() {
        let (n_in, n_out, rows) = (3072, 5, 4);
        let cases: [(i8, i8); 4] = [(i8::MIN, i8::MIN), (i8::MIN, 127), (127, -127), (127, 127)];
        for (xv, wv) in cases {
            let backend = Int8Backend::new(&server(n_in, n_out, vec![wv; n_in * n_out]));
            for direction in [Direction::Forward, Direction::Backward] {
                let call = LinearCall { layer: LayerId(0), direction, stage: fhe_ir::Stage::Apply };
                let k = if direction == Direction::Forward { n_in } else { n_out };
                let q = QuantizedRows { rows, cols: k, values: vec![xv; rows * k], scales: vec![1.0; rows] };
                let got = backend.integer_product(call, &q).unwrap();
                let want = naive(&q.values, rows, &vec![wv; n_in * n_out], n_in, n_out, direction == Direction::Backward);
                assert_eq!(got, want, "{direction} with x = {xv}, w = {wv}");
            }
        }
        // Mixed values, checked against the naive loops.
        let w: Vec<i8> = (0..n_in * n_out).map(|i| ((i * 37) % 255) as i32 as i8).map(|v| v.max(-127)).collect();
        let backend = Int8Backend::new(&server(n_in, n_out, w.clone()));
        let x: Vec<i8> = (0..rows * n_in).map(|i| ((i * 91) % 255) as i32 as i8).map(|v| v.max(-127)).collect();
        let call = LinearCall { layer: LayerId(0), direction: Direction::Forward, stage: fhe_ir::Stage::Apply };
        let q = QuantizedRows { rows, cols: n_in, values: x.clone(), scales: vec![1.0; rows] };
        assert_eq!(backend.integer_product(call, &q).unwrap(), naive(&x, rows, &w, n_in, n_out, false));
    }

    #[test]
    fn a_block_of_the_wrong_width_is_an_error() {
        let backend = Int8Backend::new(&server(4, 3, vec![1; 12]));
        let call = LinearCall { layer: LayerId(0), direction: Direction::Forward, stage: fhe_ir::Stage::Seal };
        let x = Tensor::from_f32(&[2, 3], vec![0.0; 6]).unwrap();
        assert!(backend.seal(call, &x).err().unwrap().to_string().contains("expected a [tokens, 4] block"));
        let unknown = LinearCall { layer: LayerId(9), ..call };
        assert!(backend.seal(unknown, &x).err().unwrap().to_string().contains("layer 9 is not in the server artifact"));
    }
}
