//! fhe-alloc: the global allocator of fhe-lora's binaries.
//!
//! Training and serving allocate and free tensors of tens to hundreds of MB many times per
//! step. Returning them to the OS and faulting them in again costs more than the work on
//! them on the virtual machines we run on: page faults took 46 s of system time in a 12 s
//! clear training step of GPT-2-small (4 × 128 tokens), 10 s once freed memory was kept
//! (docs/BENCHMARKS.md). So binaries use mimalloc and tell it never to purge: freed memory is
//! reused, and the resident size stays at its peak, which is what we budget anyway.
//!
//! Each binary declares:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: fhe_alloc::Allocator = fhe_alloc::Allocator;
//! ```
//! and calls [`keep_freed_memory`] first thing in `main`.

pub use mimalloc::MiMalloc as Allocator;

/// `mi_option_purge_delay` in mimalloc's option enum (the same index in v2 and v3; the Rust
/// bindings name the options around it, 14 and 16, but not this one).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (purge delay −1). The environment
/// variable `MIMALLOC_PURGE_DELAY` still wins when set, for experiments.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; called at start-up, before other threads exist.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
