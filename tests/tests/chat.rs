//! The chat guest under the real binary, with three clients speaking IRC
//! over real sockets.

use wasmhost_tests::Served;
use wasmhost_tests::irc::IrcClient;

fn registration_channels_private_messages_and_history(guest: &str) {
    let server = Served::start(guest, &["--config", "history=3"]);
    let addr = server.addr();
    let mut alice = IrcClient::register(addr, "alice");
    let mut bob = IrcClient::register(addr, "bob");

    // Before registration: 451; unknown commands: 421.
    let mut carol = IrcClient::connect(addr, "carol");
    carol.send("JOIN #rust");
    carol.expect(" 451 * :You have not registered");
    // Nick collision, case-insensitively, then a free nick.
    carol.send("NICK ALICE");
    carol.expect(" 433 * ALICE :Nickname is already in use");
    carol.send("NICK carol");
    carol.send("USER carol 0 * :Carol");
    carol.expect(" 001 carol ");
    carol.send("FROB");
    carol.expect(" 421 carol FROB :Unknown command");

    alice.send("JOIN #rust");
    alice.expect(":alice!alice@127.0.0.1 JOIN #rust");
    alice.expect(" 353 alice = #rust :alice");
    alice.expect(" 366 alice #rust :End of /NAMES list");
    alice.send("TOPIC #rust");
    alice.expect(" 331 alice #rust :No topic is set");
    alice.send("TOPIC #rust :Wasm all the things");
    alice.expect("TOPIC #rust :Wasm all the things");
    for i in 1..=4 {
        alice.send(&format!("PRIVMSG #rust :message {i}"));
    }
    alice.sync("a1");

    // Bob joins: topic, names, and the last 3 messages (history=3).
    bob.send("JOIN #rust");
    bob.expect(" 332 bob #rust :Wasm all the things");
    bob.expect(" 353 bob = #rust :alice bob");
    bob.expect(" 366 bob #rust ");
    let replay = bob.sync("b1");
    let history: Vec<&String> = replay
        .iter()
        .filter(|l| l.contains("PRIVMSG #rust"))
        .collect();
    assert_eq!(history.len(), 3, "{replay:#?}");
    assert!(history[0].ends_with(":message 2") && history[2].ends_with(":message 4"));
    alice.expect(":bob!bob@127.0.0.1 JOIN #rust");

    // Channel messages go to the other members, not back to the sender,
    // and not to non-members.
    carol.send("JOIN #rust");
    bob.expect(":carol!carol@127.0.0.1 JOIN #rust");
    alice.expect(":carol!carol@127.0.0.1 JOIN #rust");
    bob.send("PRIVMSG #rust :hello from bob");
    alice.expect(":bob!bob@127.0.0.1 PRIVMSG #rust :hello from bob");
    carol.expect(":bob!bob@127.0.0.1 PRIVMSG #rust :hello from bob");
    let bob_saw = bob.sync("b2");
    assert!(
        !bob_saw.iter().any(|l| l.contains("hello from bob")),
        "{bob_saw:#?}"
    );

    // Private messages, and errors for unknown targets.
    alice.send("PRIVMSG carol :psst");
    carol.expect(":alice!alice@127.0.0.1 PRIVMSG carol :psst");
    alice.send("PRIVMSG nobody :hi");
    alice.expect(" 401 alice nobody :No such nick/channel");
    alice.send("JOIN nochan");
    alice.expect(" 403 alice nochan :No such channel");
    bob.send("PART #rust :bye");
    alice.expect(":bob!bob@127.0.0.1 PART #rust :bye");
    bob.send("PRIVMSG #rust :still here?");
    bob.expect(" 404 bob #rust :Cannot send to channel");
    bob.send("NAMES #rust");
    bob.expect(" 353 bob = #rust :alice carol");

    // Nick change is seen by channel peers; QUIT tells them and closes.
    carol.send("NICK caroline");
    alice.expect(":carol!carol@127.0.0.1 NICK :caroline");
    carol.send("QUIT :gone home");
    let last = carol.read_to_close();
    assert!(
        last.iter().any(|l| l.starts_with("ERROR :Closing Link")),
        "{last:#?}"
    );
    alice.expect(":caroline!carol@127.0.0.1 QUIT :Quit: gone home");
    // The nick is free again.
    let _carol2 = IrcClient::register(addr, "caroline");

    // A client that just disconnects is reported too.
    drop(alice);
    let mut dave = IrcClient::register(addr, "dave");
    dave.send("JOIN #rust");
    dave.expect(" 353 dave = #rust :");
    let names = dave.expect(" 366 dave #rust");
    assert!(
        !dave
            .seen
            .iter()
            .any(|l| l.contains(" 353 ") && l.contains("alice")),
        "{names}: {:#?}",
        dave.seen
    );
}

fn partial_lines_are_kept_until_complete(guest: &str) {
    let server = Served::start(guest, &[]);
    let mut alice = IrcClient::register(server.addr(), "alice");
    let mut bob = IrcClient::register(server.addr(), "bob");
    bob.send("JOIN #x");
    bob.expect(" 366 bob #x ");
    alice.send("JOIN #x");
    alice.expect(" 366 alice #x ");
    // The pause only makes it likely that the halves arrive in separate
    // reads; the assertions hold either way.
    alice.send_raw(b"PRIVMSG #x :one ");
    std::thread::sleep(std::time::Duration::from_millis(20));
    alice.send_raw(b"two\r\nPRIVMSG #x :thr");
    bob.expect(":alice!alice@127.0.0.1 PRIVMSG #x :one two");
    std::thread::sleep(std::time::Duration::from_millis(20));
    alice.send_raw(b"ee\n");
    bob.expect(":alice!alice@127.0.0.1 PRIVMSG #x :three");
}

// Every test above runs against each implementation of the service, which
// must answer byte for byte alike.
wasmhost_tests::against! {
    rust => "chat", javascript => "chat-js";
    registration_channels_private_messages_and_history,
    partial_lines_are_kept_until_complete,
}
