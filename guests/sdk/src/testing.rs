//! Unit-testing a service natively: [`TestHost`] drives it through the
//! same runtime the component uses and returns each event's effects.
//!
//! ```ignore
//! let mut host = TestHost::<Counter>::start(&[]).unwrap();
//! let (conn, _) = host.connect();
//! let effects = host.data(conn, "a\nb\n");
//! assert_eq!(effects.text_to(conn), "1\n2\n");
//! let next = host.swap_to::<Counter>("counter/1").unwrap();
//! ```

use std::ops::Deref;

use crate::host::Effect;
use crate::{ConnId, ConnInfo, Runtime, Service};

/// One event's effects, in the order the service asked for them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects(pub Vec<Effect>);

impl Deref for Effects {
    type Target = [Effect];
    fn deref(&self) -> &[Effect] {
        &self.0
    }
}

impl Effects {
    /// Every byte sent to `conn`, in order.
    pub fn sent_to(&self, conn: ConnId) -> Vec<u8> {
        let mut out = Vec::new();
        for effect in &self.0 {
            if let Effect::Send(c, data) = effect
                && *c == conn
            {
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// [`sent_to`](Self::sent_to) as text (invalid UTF-8 replaced).
    pub fn text_to(&self, conn: ConnId) -> String {
        String::from_utf8_lossy(&self.sent_to(conn)).into_owned()
    }

    /// Whether the service closed `conn`.
    pub fn closed(&self, conn: ConnId) -> bool {
        self.0.contains(&Effect::Close(conn))
    }

    /// The timers armed, as (token, delay in ms).
    pub fn timers_set(&self) -> Vec<(u64, u64)> {
        let set = self.0.iter().filter_map(|e| match e {
            Effect::SetTimer(token, delay) => Some((*token, *delay)),
            _ => None,
        });
        set.collect()
    }
}

/// A service run natively, one event at a time, as the host would run it.
pub struct TestHost<S: Service> {
    runtime: Runtime<S>,
    next_conn: ConnId,
}

impl<S: Service> TestHost<S> {
    /// Starts the service fresh with `config` (its `init`).
    pub fn start(config: &[(&str, &str)]) -> Result<TestHost<S>, String> {
        let mut runtime = Runtime::new();
        let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        start(|| runtime.init(config.collect()))?;
        Ok(TestHost {
            runtime,
            next_conn: 1,
        })
    }

    /// Starts the service from a state written in `format` (its
    /// `import-state`), as a swap would.
    pub fn from_state(format: &str, state: &[u8]) -> Result<TestHost<S>, String> {
        let mut runtime = Runtime::new();
        start(|| runtime.import(format, state.to_vec()))?;
        let next_conn = runtime.pending().keys().max().map_or(1, |c| c + 1);
        Ok(TestHost { runtime, next_conn })
    }

    /// A client connects from 127.0.0.1 to the `default` listener.
    pub fn connect(&mut self) -> (ConnId, Effects) {
        let id = self.next_conn;
        let info = ConnInfo {
            id,
            listener: "default".into(),
            peer: format!("127.0.0.1:{}", 40000 + id % 20000),
        };
        (id, self.connect_with(info))
    }

    /// A client connects with this connection info.
    pub fn connect_with(&mut self, info: ConnInfo) -> Effects {
        self.next_conn = self.next_conn.max(info.id + 1);
        run(|| self.runtime.connect(&info))
    }

    /// `data` arrives on `conn`.
    pub fn data(&mut self, conn: ConnId, data: impl AsRef<[u8]>) -> Effects {
        let data = data.as_ref().to_vec();
        run(|| self.runtime.data(conn, data))
    }

    /// `conn` closes.
    pub fn close(&mut self, conn: ConnId) -> Effects {
        run(|| self.runtime.close(conn))
    }

    /// Timer `token` fires.
    pub fn timer(&mut self, token: u64) -> Effects {
        run(|| self.runtime.timer(token))
    }

    /// Sets the time [`host::now_ms`](crate::host::now_ms) returns on this
    /// thread from now on.
    pub fn set_now_ms(&mut self, now: u64) {
        crate::host::native::NOW.set(Some(now));
    }

    pub fn importable(&self) -> Vec<String> {
        self.runtime.importable()
    }

    pub fn exportable(&self) -> Vec<String> {
        self.runtime.exportable()
    }

    /// The state in `format` (its `export-state`).
    pub fn export(&self, format: &str) -> Result<Vec<u8>, String> {
        self.runtime.export(format)
    }

    /// Swaps to `T` (another version, or the same type): exports in
    /// `format` and imports into a fresh `T`, keeping the connections.
    pub fn swap_to<T: Service>(self, format: &str) -> Result<TestHost<T>, String> {
        let state = self.export(format)?;
        let mut next = TestHost::<T>::from_state(format, &state)?;
        next.next_conn = next.next_conn.max(self.next_conn);
        Ok(next)
    }

    /// The service.
    pub fn service(&self) -> &S {
        self.runtime.service().expect("started")
    }

    pub fn service_mut(&mut self) -> &mut S {
        self.runtime.service_mut().expect("started")
    }

    /// `conn`'s unconsumed input.
    pub fn pending(&self, conn: ConnId) -> &[u8] {
        self.runtime.pending().get(&conn).map_or(&[], Vec::as_slice)
    }
}

/// Runs one event and returns its effects.
fn run(event: impl FnOnce()) -> Effects {
    crate::host::native::take();
    event();
    Effects(crate::host::native::take())
}

/// Runs `init` or `import-state`, whose effects the host would carry out
/// but a test rarely looks at.
fn start(call: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    crate::host::native::take();
    let result = call();
    crate::host::native::take();
    result
}
