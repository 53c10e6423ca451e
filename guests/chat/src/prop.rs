//! Property tests, run natively (`cargo test -p guest-chat`): the IRC
//! parser and the chat service never panic on arbitrary bytes, the `chat/1`
//! reader refuses garbage and truncations without panicking, and the
//! state's round trip stays exact whatever clients send.

use proptest::prelude::*;
use wasmhost_guest::testing::TestHost;

use super::{CHAT1, Chat, irc};

/// IRC lines from a small vocabulary, so they register, join and talk.
fn line() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "NICK alice",
        "NICK bob",
        "USER a 0 * :Alice",
        "JOIN #rust",
        "JOIN #a,#b",
        "PART #rust",
        "PRIVMSG #rust :hi",
        "PRIVMSG bob :psst",
        "TOPIC #rust :news",
        "NAMES #rust",
        "PING x",
        "QUIT :bye",
        "MODE #rust",
        ":prefix NOTICE #rust :n",
        "",
    ])
    .prop_map(|l| format!("{l}\r\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_irc_parser_never_panics(text in ".{0,200}") {
        let _ = irc::parse(&text);
    }

    #[test]
    fn the_service_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600), split in 1usize..50) {
        let mut host = TestHost::<Chat>::start(&[]).unwrap();
        let (c, _) = host.connect();
        for piece in bytes.chunks(split) {
            host.data(c, piece);
        }
        host.close(c);
    }

    #[test]
    fn the_state_reader_refuses_garbage_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = TestHost::<Chat>::from_state(CHAT1, &bytes);
    }

    /// Two users talking in arbitrary pieces: the export imports back to
    /// the same bytes, and every cut of it is refused.
    #[test]
    fn the_round_trip_stays_exact(a in prop::collection::vec(line(), 0..20), b in prop::collection::vec(line(), 0..20), split in 1usize..30, cut in any::<prop::sample::Index>()) {
        let mut host = TestHost::<Chat>::start(&[]).unwrap();
        let (x, _) = host.connect();
        let (y, _) = host.connect();
        for (conn, lines) in [(x, a), (y, b)] {
            for piece in lines.concat().as_bytes().chunks(split) {
                host.data(conn, piece);
            }
        }
        let before = host.export(CHAT1).unwrap();
        let cut = cut.index(before.len());
        prop_assert!(TestHost::<Chat>::from_state(CHAT1, &before[..cut]).is_err());
        let host = host.swap_to::<Chat>(CHAT1).unwrap();
        prop_assert_eq!(host.export(CHAT1).unwrap(), before);
    }
}
