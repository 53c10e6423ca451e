//! Property tests, run natively (`cargo test -p guest-kv`): the RESP parser
//! and the `kv/1` reader never panic on arbitrary or truncated bytes, and
//! whatever a client sends, the state's round trip stays exact.

use proptest::prelude::*;
use wasmhost_guest::testing::TestHost;

use super::Kv;
use super::resp::{Parsed, parse};

/// RESP commands, well-formed, from a small vocabulary (so they do things).
fn command() -> impl Strategy<Value = Vec<u8>> {
    let name = prop::sample::select(vec![
        "SET", "GET", "DEL", "INCR", "APPEND", "LPUSH", "RPUSH", "LPOP", "RPOP", "EXPIRE",
        "PEXPIRE", "PERSIST", "MSET", "FLUSHALL", "DBSIZE", "LRANGE",
    ]);
    let arg = prop::sample::select(vec!["k", "l", "n", "1", "-1", "0", "100", "x y", ""]);
    (name, prop::collection::vec(arg, 0..4)).prop_map(|(name, args)| {
        let mut out = format!("*{}\r\n${}\r\n{name}\r\n", args.len() + 1, name.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        out.into_bytes()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_parser_never_panics_and_never_overreads(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Parsed::Command(used) = parse(&bytes, &mut Vec::new()) {
            prop_assert!(used <= bytes.len());
        }
    }

    #[test]
    fn a_command_cut_anywhere_is_incomplete(cmd in command(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(cmd.len());
        prop_assert_eq!(parse(&cmd[..cut], &mut Vec::new()), Parsed::Incomplete);
        prop_assert!(matches!(parse(&cmd, &mut Vec::new()), Parsed::Command(n) if n == cmd.len()));
    }

    #[test]
    fn the_state_reader_refuses_garbage_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = TestHost::<Kv>::from_state("kv/1", &bytes);
    }

    #[test]
    fn a_truncated_state_is_refused(cmds in prop::collection::vec(command(), 1..20), cut in any::<prop::sample::Index>()) {
        let mut host = TestHost::<Kv>::start(&[]).unwrap();
        let (c, _) = host.connect();
        host.data(c, cmds.concat());
        let state = host.export("kv/1").unwrap();
        let cut = cut.index(state.len());
        prop_assert!(TestHost::<Kv>::from_state("kv/1", &state[..cut]).is_err());
    }

    /// Arbitrary commands in arbitrary pieces: the export imports back to
    /// the same bytes (what a snapshot and a swap rely on).
    #[test]
    fn the_round_trip_stays_exact(cmds in prop::collection::vec(command(), 0..30), split in 1usize..40, junk in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut host = TestHost::<Kv>::start(&[]).unwrap();
        let (c, _) = host.connect();
        let mut input = cmds.concat();
        input.extend_from_slice(&junk);
        for piece in input.chunks(split) {
            host.data(c, piece);
        }
        let before = host.export("kv/1").unwrap();
        let host = host.swap_to::<Kv>("kv/1").unwrap();
        prop_assert_eq!(host.export("kv/1").unwrap(), before);
    }
}
