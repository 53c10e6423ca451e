//! `echo`: sends every byte back to the connection it came from. Stateless,
//! so its state format is trivial: it exports and imports `echo/1`, an
//! empty state.
//!
//! Built with the `stateless` feature it is echo-stateless: no state format
//! at all (an empty `exportable()` is how a guest says it has no shared
//! state, which `swap --drain` and `--canary` require), and it traps on
//! input that holds `TRAP-NEW`, so tests can make a new version trap.
//! With `v2` as well it is echo-stateless-v2, the same service as another
//! build (it logs its version at `init`), for tests that swap between two
//! stateless versions.

use wasmhost_guest::state::{Formats, Pending};
use wasmhost_guest::{ConnId, Input, Service, host};

struct Echo;

impl Service for Echo {
    fn init(_config: Vec<(String, String)>) -> Result<Self, String> {
        if cfg!(feature = "v2") {
            host::log(wasmhost_guest::LogLevel::Info, "echo v2 started");
        }
        Ok(Echo)
    }

    fn on_data(&mut self, conn: ConnId, input: &mut Input) {
        if cfg!(feature = "stateless") && input.bytes().windows(8).any(|w| w == b"TRAP-NEW") {
            panic!("echo-stateless: TRAP-NEW");
        }
        host::send(conn, input.bytes());
        input.clear();
    }

    fn formats() -> Formats<Self> {
        if cfg!(feature = "stateless") {
            return Formats::new();
        }
        Formats::new().format("echo/1", |_, _| Ok(Vec::new()), |s| import(&s))
    }
}

fn import(state: &[u8]) -> Result<(Echo, Pending), String> {
    match state.is_empty() {
        true => Ok((Echo, Pending::new())),
        false => Err("echo/1 state must be empty".into()),
    }
}

wasmhost_guest::export_service!(Echo);

#[cfg(test)]
mod tests {
    use wasmhost_guest::testing::TestHost;

    use super::*;

    #[test]
    fn echoes_and_swaps() {
        let mut host = TestHost::<Echo>::start(&[]).unwrap();
        let (a, _) = host.connect();
        assert_eq!(host.data(a, "hi").sent_to(a), b"hi");
        assert_eq!(host.exportable(), ["echo/1"]);
        let mut next = host.swap_to::<Echo>("echo/1").unwrap();
        assert_eq!(next.data(a, "again").text_to(a), "again");
        assert!(TestHost::<Echo>::from_state("echo/1", b"x").is_err());
    }
}
