//! fhe-train: the client side of fine-tuning: training data ([`data`]) and the training loop
//! ([`trainer`]).

pub mod data;
pub mod trainer;
