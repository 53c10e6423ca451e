//! The one `bindgen!` over `guest-wit/`: Rust types for the `service` world.
//!
//! Host imports are plain synchronous functions (they only record effects);
//! guest exports are called asynchronously so that epoch deadlines can yield
//! to tokio instead of blocking a worker thread.

wasmtime::component::bindgen!({
    path: "../guest-wit",
    world: "service",
    exports: { default: async },
});

pub use self::wasmhost::service::types::{ConnInfo, LogLevel};
pub use exports::wasmhost::service::{handler, migrate};
