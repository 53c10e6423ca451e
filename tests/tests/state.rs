//! `export-state` from one instance and `import-state` into a fresh one
//! keeps everything, including a half-received command. Uses the library
//! (real wasmtime, real guests) so each step can be checked on its own.

use std::sync::Arc;

use wasmhost::bindings::ConnInfo;
use wasmhost::engine::Runtime;
use wasmhost::service::{Effect, Instance, InstanceLimits, Program};
use wasmhost_tests::{guest, test_cache};

async fn instance(name: &str) -> Instance {
    let runtime = Runtime::new(Some(test_cache())).unwrap();
    let program = Program::prepare(&runtime, &guest(name)).unwrap();
    Instance::new(program, Arc::from("test"), &InstanceLimits::default())
        .await
        .unwrap()
}

fn info(id: u64) -> ConnInfo {
    ConnInfo {
        id,
        listener: "default".into(),
        peer: format!("127.0.0.1:{}", 40000 + id),
    }
}

/// Delivers `data` and returns what the instance sent to `conn`.
async fn data(inst: &mut Instance, conn: u64, data: &[u8]) -> String {
    inst.on_data(conn, data).await.unwrap();
    let mut sent = Vec::new();
    for effect in inst.take_effects() {
        if let Effect::Send(to, bytes) = effect
            && to == conn
        {
            sent.extend_from_slice(&bytes);
        }
    }
    String::from_utf8(sent).unwrap()
}

#[tokio::test]
async fn kv_state_moves_with_a_half_received_command() {
    let mut old = instance("kv").await;
    old.init(&[]).await.unwrap().unwrap();
    for id in [1, 2] {
        old.on_connect(&info(id)).await.unwrap();
    }
    let r = data(
        &mut old,
        1,
        b"SET a 1\r\nRPUSH l x y z\r\nSET t v EX 1000\r\nSET gone v PX 1\r\n",
    )
    .await;
    assert_eq!(r, "+OK\r\n:3\r\n+OK\r\n+OK\r\n");
    // Connection 2 is half-way through `GET a`.
    assert_eq!(data(&mut old, 2, b"*2\r\n$3\r\nGET\r\n$1\r").await, "");
    std::thread::sleep(std::time::Duration::from_millis(5)); // let `gone` expire

    assert_eq!(old.exportable().await.unwrap(), vec!["kv/1"]);
    let state = old.export_state("kv/1").await.unwrap().unwrap();
    // Exporting does not disturb the old instance.
    assert_eq!(data(&mut old, 1, b"GET a\r\n").await, "$1\r\n1\r\n");

    let mut new = instance("kv").await;
    assert_eq!(new.importable().await.unwrap(), vec!["kv/1"]);
    new.import_state("kv/1", &state).await.unwrap().unwrap();
    // The rest of connection 2's command completes it.
    assert_eq!(data(&mut new, 2, b"\na\r\n").await, "$1\r\n1\r\n");
    let r = data(
        &mut new,
        1,
        b"LRANGE l 0 -1\r\nTTL t\r\nEXISTS gone\r\nDBSIZE\r\n",
    )
    .await;
    assert_eq!(
        r,
        "*3\r\n$1\r\nx\r\n$1\r\ny\r\n$1\r\nz\r\n:1000\r\n:0\r\n:3\r\n"
    );
}

#[tokio::test]
async fn kv_import_rejects_bad_state_and_formats() {
    let mut new = instance("kv").await;
    let err = new
        .import_state("kv/1", b"garbage")
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.contains("invalid kv/1 state: expected \"KV/1\" at byte 0"),
        "{err}"
    );
    let err = new
        .import_state("kv/1", b"KV/1\x05\0\0\0\0\0\0\0")
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.contains("count 5 at byte 4 is more than the 0 bytes left"),
        "{err}"
    );
    let err = new.import_state("kv/9", b"").await.unwrap().unwrap_err();
    assert!(
        err.contains("cannot import kv/9: this version imports [kv/1]"),
        "{err}"
    );
    new.init(&[]).await.unwrap().unwrap();
    let err = new.export_state("json").await.unwrap().unwrap_err();
    assert!(
        err.contains("cannot export json: this version exports [kv/1] now"),
        "{err}"
    );
}

#[tokio::test]
async fn chat_state_moves_with_users_channels_history_and_partial_lines() {
    let mut old = instance("chat").await;
    old.init(&[("server_name".into(), "irc.test".into())])
        .await
        .unwrap()
        .unwrap();
    for id in [1, 2] {
        old.on_connect(&info(id)).await.unwrap();
    }
    data(
        &mut old,
        1,
        b"NICK alice\r\nUSER a 0 * :Alice\r\nJOIN #rust\r\nTOPIC #rust :wasm\r\n",
    )
    .await;
    data(&mut old, 1, b"PRIVMSG #rust :first\r\nPRIVMSG #rust :sec").await;
    data(&mut old, 2, b"NICK bob\r\n").await;
    let state = old.export_state("chat/1").await.unwrap().unwrap();

    let mut new = instance("chat").await;
    new.import_state("chat/1", &state).await.unwrap().unwrap();
    // Alice's half line completes; Bob finishes registering and joins.
    data(&mut new, 1, b"ond\r\n").await;
    let r = data(&mut new, 2, b"USER b 0 * :Bob\r\nJOIN #rust\r\n").await;
    assert!(r.contains(":irc.test 001 bob "), "{r}");
    assert!(r.contains(":irc.test 332 bob #rust :wasm"), "{r}");
    assert!(r.contains(":irc.test 353 bob = #rust :alice bob"), "{r}");
    assert!(
        r.contains(
            ":alice!a@127.0.0.1 PRIVMSG #rust :first\r\n:alice!a@127.0.0.1 PRIVMSG #rust :second"
        ),
        "{r}"
    );
    // Alice's nick is still taken.
    let r = data(&mut new, 2, b"NICK Alice\r\n").await;
    assert!(r.contains(" 433 bob Alice "), "{r}");
}
