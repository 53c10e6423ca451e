//! What a service asks of the host: send, close, timers, log, and the time.
//!
//! In WebAssembly these call the host's imports; each records an effect
//! that the host carries out when the current event returns, in order.
//! Natively (in `cargo test`) they are recorded in this thread's list of
//! effects, which [`testing::TestHost`](crate::testing::TestHost) returns
//! per event, so a service's handlers run unchanged under a unit test.

use crate::{ConnId, LogLevel};

/// Something a service asked the host to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Send(ConnId, Vec<u8>),
    Close(ConnId),
    SetTimer(u64, u64),
    CancelTimer(u64),
    Log(LogLevel, String),
}

/// Queues `data` for sending on `conn`, after everything queued before.
/// Bytes for a closed or unknown connection are dropped.
pub fn send(conn: ConnId, data: &[u8]) {
    #[cfg(target_family = "wasm")]
    crate::bindings::wasmhost::service::host::send(conn, data);
    #[cfg(not(target_family = "wasm"))]
    native::record(Effect::Send(conn, data.to_vec()));
}

/// Closes `conn` once everything queued on it is sent; `on_close` follows.
pub fn close(conn: ConnId) {
    #[cfg(target_family = "wasm")]
    crate::bindings::wasmhost::service::host::close(conn);
    #[cfg(not(target_family = "wasm"))]
    native::record(Effect::Close(conn));
}

/// Arms timer `token` to fire once, `delay_ms` from now (re-arming moves it).
pub fn set_timer(token: u64, delay_ms: u64) {
    #[cfg(target_family = "wasm")]
    crate::bindings::wasmhost::service::host::set_timer(token, delay_ms);
    #[cfg(not(target_family = "wasm"))]
    native::record(Effect::SetTimer(token, delay_ms));
}

/// Disarms timer `token`, if armed.
pub fn cancel_timer(token: u64) {
    #[cfg(target_family = "wasm")]
    crate::bindings::wasmhost::service::host::cancel_timer(token);
    #[cfg(not(target_family = "wasm"))]
    native::record(Effect::CancelTimer(token));
}

/// Writes `message` to the host log at `level`, tagged with the service.
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_family = "wasm")]
    crate::bindings::wasmhost::service::host::log(level, message);
    #[cfg(not(target_family = "wasm"))]
    native::record(Effect::Log(level, message.to_string()));
}

/// The wall-clock time in Unix milliseconds. Under a
/// [`TestHost`](crate::testing::TestHost) it is the test's clock
/// ([`TestHost::set_now_ms`](crate::testing::TestHost::set_now_ms)) once set.
pub fn now_ms() -> u64 {
    #[cfg(not(target_family = "wasm"))]
    if let Some(now) = native::NOW.get() {
        return now;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(not(target_family = "wasm"))]
pub(crate) mod native {
    use std::cell::{Cell, RefCell};

    use super::Effect;

    thread_local! {
        pub(crate) static EFFECTS: RefCell<Vec<Effect>> = const { RefCell::new(Vec::new()) };
        pub(crate) static NOW: Cell<Option<u64>> = const { Cell::new(None) };
    }

    pub(crate) fn record(effect: Effect) {
        EFFECTS.with_borrow_mut(|e| e.push(effect));
    }

    pub(crate) fn take() -> Vec<Effect> {
        EFFECTS.take()
    }
}
