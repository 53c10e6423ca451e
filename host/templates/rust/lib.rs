//! {{name}}: echoes every line back, numbered. A wasmhost service made by
//! `wasmhost new`; replace the logic with yours.
//!
//! State format `{{name}}/1` (little-endian; `bytes` = u32 length + bytes):
//!
//! ```text
//! lines    u64      lines echoed so far
//! nconns   u64
//! nconns times:
//!   conn     u64    connection id
//!   pending  bytes  the connection's unfinished line
//! ```

use wasmhost_guest::state::{Formats, Pending, Reader, Writer};
use wasmhost_guest::{ConnId, Input, Service, host};

const FORMAT: &str = "{{name}}/1";

struct App {
    lines: u64,
}

impl Service for App {
    /// Longest line accepted; a longer one closes the connection.
    const MAX_INPUT: usize = 64 * 1024;

    fn init(_config: Vec<(String, String)>) -> Result<Self, String> {
        Ok(App { lines: 0 })
    }

    fn on_data(&mut self, conn: ConnId, input: &mut Input) {
        while let Some(line) = input.line() {
            self.lines += 1;
            let mut reply = format!("{} ", self.lines).into_bytes();
            reply.extend_from_slice(line);
            reply.push(b'\n');
            host::send(conn, &reply);
        }
    }

    fn formats() -> Formats<Self> {
        Formats::new().format(FORMAT, export, import)
    }
}

fn export(app: &App, pending: &Pending) -> Result<Vec<u8>, String> {
    let mut w = Writer::new();
    w.u64(app.lines).u64(pending.len() as u64);
    for (conn, bytes) in pending {
        w.u64(*conn).bytes(bytes);
    }
    Ok(w.finish())
}

/// The state's buffer is handed over (`Vec<u8>`): a service may keep its
/// data in it instead of copying it out.
fn import(state: Vec<u8>) -> Result<(App, Pending), String> {
    let mut r = Reader::new(&state);
    let app = App { lines: r.u64()? };
    let mut pending = Pending::new();
    for _ in 0..r.count(12)? {
        let conn = r.u64()?;
        pending.insert(conn, r.bytes()?.to_vec());
    }
    r.finish()?;
    Ok((app, pending))
}

wasmhost_guest::export_service!(App);

#[cfg(test)]
mod tests {
    use wasmhost_guest::testing::TestHost;

    use super::*;

    #[test]
    fn numbers_lines_and_keeps_a_half_line_across_a_swap() {
        let mut host = TestHost::<App>::start(&[]).unwrap();
        let (c, _) = host.connect();
        assert_eq!(host.data(c, "a\nb\nha").text_to(c), "1 a\n2 b\n");
        let mut host = host.swap_to::<App>(FORMAT).unwrap();
        assert_eq!(host.data(c, "lf\n").text_to(c), "3 half\n");
    }
}
