//! The server's handler: a request in, a response out, for one layer and direction. Holds
//! only the int8 weights; no key, no per-client state.

use std::collections::HashMap;

use fhe_exec::artifact::ServerArtifact;
use fhe_ir::{Direction, LayerId};
use rayon::prelude::*;

use crate::kernel::{linear_combination, PackedWeights, ROW_BLOCK};
use crate::wire::{decode_request, encode_response, CallHeader};
use crate::{expand_masks, restore_bits, round_to_bits, EncryptedOutput, RlweError, POLY_SIZE};

/// One layer's weights in both output-major orientations, rows padded to the kernel's block.
struct LayerWeights {
    in_features: usize,
    out_features: usize,
    /// `out × in`: forward outputs combine input features.
    forward: PackedWeights,
    /// `in × out`: backward outputs (input gradients) combine output features.
    backward: PackedWeights,
}

fn padded(rows: usize) -> usize {
    rows.div_ceil(ROW_BLOCK) * ROW_BLOCK
}

impl LayerWeights {
    /// From the artifact's row-major `[in, out]` int8 weight.
    fn new(in_features: usize, out_features: usize, w: &[i8]) -> LayerWeights {
        let mut forward = vec![0i8; padded(out_features) * in_features];
        for i in 0..in_features {
            for j in 0..out_features {
                forward[j * in_features + i] = w[i * out_features + j];
            }
        }
        let mut backward = w.to_vec();
        backward.resize(padded(in_features) * out_features, 0);
        LayerWeights {
            in_features,
            out_features,
            forward: PackedWeights::new(forward, padded(out_features), in_features),
            backward: PackedWeights::new(backward, padded(in_features), out_features),
        }
    }

    /// (weights, input width, output width) for a direction.
    fn oriented(&self, direction: Direction) -> (&PackedWeights, usize, usize) {
        match direction {
            Direction::Forward => (&self.forward, self.in_features, self.out_features),
            Direction::Backward => (&self.backward, self.out_features, self.in_features),
        }
    }
}

pub struct LinearServer {
    layers: HashMap<LayerId, LayerWeights>,
}

impl LinearServer {
    pub fn new(artifact: &ServerArtifact) -> LinearServer {
        let layers = artifact
            .layers
            .iter()
            .map(|(&id, l)| (id, LayerWeights::new(l.entry.in_features, l.entry.out_features, &l.qweight)))
            .collect();
        LinearServer { layers }
    }

    /// From raw `[in, out]` int8 weights, for tests and benchmarks.
    pub fn from_weights(layers: Vec<(LayerId, usize, usize, Vec<i8>)>) -> LinearServer {
        LinearServer { layers: layers.into_iter().map(|(id, i, o, w)| (id, LayerWeights::new(i, o, &w))).collect() }
    }

    /// Input and output width of a call, if the layer exists.
    pub fn widths(&self, layer: LayerId, direction: Direction) -> Option<(usize, usize)> {
        self.layers.get(&layer).map(|l| {
            let (_, n, m) = l.oriented(direction);
            (n, m)
        })
    }

    /// Decodes, checks against the layer table, computes, encodes.
    pub fn handle(&self, layer: LayerId, direction: Direction, body: &[u8]) -> Result<Vec<u8>, RlweError> {
        let weights = self.layers.get(&layer).ok_or(RlweError::UnknownLayer(layer.0, self.layers.len().saturating_sub(1)))?;
        let (call, block) = decode_request(body)?;
        if call != (CallHeader { layer, direction }) {
            return Err(RlweError::Wire(format!(
                "the request is for {} {} but was sent to {layer} {direction}",
                call.layer, call.direction
            )));
        }
        let (w, n, m) = weights.oriented(direction);
        if block.inputs != n {
            return Err(RlweError::Shape(format!("{layer} {direction} takes {n} features per token, the request has {}", block.inputs)));
        }
        // Masks and bodies combine with the same weights: two products of n × N coefficients.
        // Both are used at their top bits only (the setting's input width); rounded values
        // have zero low limbs, which the kernel skips.
        let setting = block.setting;
        let (mask_bits, body_bits) = (setting.mask_bits(), setting.input_bits());
        let mut masks = expand_masks(block.seed, n);
        if mask_bits < 64 {
            masks.par_iter_mut().for_each(|a| *a = restore_bits(round_to_bits(*a, mask_bits), mask_bits));
        }
        let bodies: Vec<u64> = block.bodies.par_iter().map(|&b| restore_bits(b, body_bits)).collect();
        let out_bits = setting.output_bits();
        let combine = |x: &[u64], bits: u32| -> Vec<u64> {
            let mut y = linear_combination(w, x, POLY_SIZE, 64 - bits);
            y.truncate(m * POLY_SIZE);
            y.par_iter_mut().for_each(|v| *v = round_to_bits(*v, out_bits));
            y
        };
        let (out_masks, out_bodies) = (combine(&masks, mask_bits), combine(&bodies, body_bits));
        let output = EncryptedOutput { setting: block.setting, tokens: block.tokens, outputs: m, masks: out_masks, bodies: out_bodies };
        Ok(encode_response(call, &output))
    }
}
