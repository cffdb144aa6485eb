//! fhe-train: the client side of fine-tuning. So far: training data (see [`data`]).

pub mod data;
