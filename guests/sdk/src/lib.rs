//! Write a wasmhost service in Rust by writing only its logic.
//!
//! A service is a type implementing [`Service`]: it is created by
//! [`Service::init`] (a fresh start) or by one of its state formats' import
//! (a swap, rollback or host upgrade), and gets `&mut self` for every event.
//! [`export_service!`] turns it into the component's exports.
//!
//! What the SDK does so that a guest does not have to:
//!
//! * **Input buffers.** Bytes arrive as the network splits them. The SDK
//!   keeps each connection's unconsumed bytes and hands them to
//!   [`Service::on_data`] as an [`Input`], with [`Input::line`] and
//!   [`Input::frame`] to take whole requests; what the service leaves stays
//!   for the next call. A buffer is capped ([`Service::MAX_INPUT`]; past it
//!   [`Service::on_overflow`] runs, by default closing the connection) and
//!   dropped when the connection closes.
//! * **State formats.** [`Service::formats`] lists the formats the service
//!   can export and import, each a pair of functions; `importable()` and
//!   `exportable()` follow from it, and the connections' unconsumed bytes are
//!   handed to the export functions and taken back from the import ones
//!   ([`state::Pending`]), so a half-received request survives a swap.
//!   [`state::Writer`] and [`state::Reader`] help write binary formats.
//! * **A test host.** [`host`]'s functions work natively too: outside
//!   WebAssembly they are recorded, and [`testing::TestHost`] drives a
//!   service through events and returns what it sent, closed and armed, so
//!   handlers can be unit-tested with `cargo test`.
//!
//! ```ignore
//! use wasmhost_guest::{ConnId, Input, Service, host, state::{Formats, Pending}};
//!
//! #[derive(Default)]
//! struct Counter { count: u64 }
//!
//! impl Service for Counter {
//!     fn init(_config: Vec<(String, String)>) -> Result<Self, String> { Ok(Counter::default()) }
//!     fn on_data(&mut self, conn: ConnId, input: &mut Input) {
//!         while let Some(_line) = input.line() {
//!             self.count += 1;
//!             host::send(conn, format!("{}\n", self.count).as_bytes());
//!         }
//!     }
//!     fn formats() -> Formats<Self> {
//!         Formats::new().format("counter/1", |c, _pending: &Pending| Ok(c.count.to_le_bytes().to_vec()),
//!             |bytes| Ok((Counter { count: wasmhost_guest::state::Reader::new(&bytes).u64()? }, Pending::new())))
//!     }
//! }
//!
//! wasmhost_guest::export_service!(Counter);
//! ```

pub mod host;
mod input;
mod runtime;
pub mod state;
#[cfg(not(target_family = "wasm"))]
pub mod testing;

pub use input::Input;
#[doc(hidden)]
pub use runtime::Runtime;

/// The generated bindings of the `wasmhost:service/service` world, for what
/// the SDK does not wrap.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../guest-wit",
        world: "service",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "wasmhost_guest::bindings",
    });
}

pub use bindings::wasmhost::service::types::{ConnId, ConnInfo, LogLevel};

/// A network service: its state, and what it does on each event.
///
/// The host calls one method at a time (no locking needed). Per connection
/// the order is `on_connect`, any number of `on_data`, then exactly one
/// `on_close`. Anything a method wants done (send, close, timers, log) goes
/// through [`host`] and happens when the method returns.
pub trait Service: Sized + 'static {
    /// Most unconsumed bytes one connection may hold between two events.
    /// Past it, [`on_overflow`](Service::on_overflow) runs.
    const MAX_INPUT: usize = 1 << 20;

    /// A fresh start, with the `--config KEY=VALUE` pairs in order. An error
    /// stops `wasmhost serve` with its text.
    fn init(config: Vec<(String, String)>) -> Result<Self, String>;

    /// A client connected.
    fn on_connect(&mut self, conn: &ConnInfo) {
        let _ = conn;
    }

    /// Bytes arrived on `conn`: `input` holds every byte not consumed
    /// before, then the new ones. Take whole requests from it; the rest
    /// stays until more arrives.
    fn on_data(&mut self, conn: ConnId, input: &mut Input);

    /// `conn` is gone (whoever closed it). Its input buffer is dropped after
    /// this returns.
    fn on_close(&mut self, conn: ConnId) {
        let _ = conn;
    }

    /// Timer `token` fired.
    fn on_timer(&mut self, token: u64) {
        let _ = token;
    }

    /// `conn`'s unconsumed input passed [`MAX_INPUT`](Service::MAX_INPUT)
    /// after an `on_data`. The default closes the connection; a service may
    /// instead answer with an error and [`Input::clear`] it.
    fn on_overflow(&mut self, conn: ConnId, input: &mut Input) {
        let _ = input;
        host::close(conn);
    }

    /// The state formats this version exports and imports, most preferred
    /// first (see [`state::Formats`]).
    fn formats() -> state::Formats<Self>;
}

/// Exports a [`Service`] as the component's `handler` and `migrate`
/// interfaces. Use it once, in the crate's root.
#[macro_export]
macro_rules! export_service {
    ($service:ty) => {
        const _: () = {
            use $crate::bindings::exports::wasmhost::service::{handler, migrate};

            ::std::thread_local! {
                static RUNTIME: ::std::cell::RefCell<$crate::Runtime<$service>> =
                    ::std::cell::RefCell::new($crate::Runtime::new());
            }

            struct Exports;

            impl handler::Guest for Exports {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    RUNTIME.with_borrow_mut(|rt| rt.init(config))
                }
                fn on_connect(conn: handler::ConnInfo) {
                    RUNTIME.with_borrow_mut(|rt| rt.connect(&conn))
                }
                fn on_data(conn: handler::ConnId, data: ::std::vec::Vec<u8>) {
                    RUNTIME.with_borrow_mut(|rt| rt.data(conn, data))
                }
                fn on_close(conn: handler::ConnId) {
                    RUNTIME.with_borrow_mut(|rt| rt.close(conn))
                }
                fn on_timer(token: u64) {
                    RUNTIME.with_borrow_mut(|rt| rt.timer(token))
                }
            }

            impl migrate::Guest for Exports {
                fn importable() -> ::std::vec::Vec<::std::string::String> {
                    RUNTIME.with_borrow(|rt| rt.importable())
                }
                fn exportable() -> ::std::vec::Vec<::std::string::String> {
                    RUNTIME.with_borrow(|rt| rt.exportable())
                }
                fn export_state(
                    format: ::std::string::String,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    RUNTIME.with_borrow(|rt| rt.export(&format))
                }
                fn import_state(
                    format: ::std::string::String,
                    state: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    RUNTIME.with_borrow_mut(|rt| rt.import(&format, state))
                }
            }

    $crate::bindings::export_world!(Exports with_types_in $crate::bindings);
        };
    };
}
