//! wasmhost: a host that keeps network services running while their
//! WebAssembly code changes.
//!
//! The host owns every socket, timer and byte buffer ([`net`]); the service
//! logic is a WebAssembly component ([`bindings`], `guest-wit/`) run by one
//! actor task per service ([`service`]) on a shared wasmtime engine
//! ([`engine`]). [`serve`] ties them together.

pub mod admin;
pub mod bindings;
pub mod check;
pub mod cli;
pub mod control;
pub mod durable;
pub mod engine;
pub mod fleet;
pub mod migrate;
pub mod net;
pub mod new;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod standby;
pub mod systemd;
pub mod upgrade;

pub use serve::{Launch, ServeOptions, Server};
