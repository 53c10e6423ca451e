//! What a guest sees of time and randomness: the host's per-event stamp.
//! Within one event the clocks stand still and the random stream is the
//! event's own; from one event to the next time moves on and the bytes
//! change.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmhost_tests::{LineConn, Served};

struct Reading {
    wall: (u128, u128),
    mono_elapsed: u128,
    random: (String, String),
}

/// Sends `clock` to the faulty guest and parses its answer.
fn read(conn: &mut LineConn) -> Reading {
    conn.send("clock");
    let line = conn.recv();
    let words: Vec<&str> = line.split(' ').collect();
    // "N clock wall W1 W2 mono-elapsed E random R1 R2"
    assert_eq!(words.len(), 10, "{line}");
    assert_eq!(
        (words[1], words[2], words[5], words[7]),
        ("clock", "wall", "mono-elapsed", "random"),
        "{line}"
    );
    let num = |s: &str| s.parse::<u128>().unwrap();
    Reading {
        wall: (num(words[3]), num(words[4])),
        mono_elapsed: num(words[6]),
        random: (words[8].to_string(), words[9].to_string()),
    }
}

#[test]
fn time_stands_still_within_an_event_and_moves_between_events() {
    let server = Served::start("faulty", &[]);
    let mut conn = LineConn::open(&server);
    let first = read(&mut conn);
    assert_eq!(first.wall.0, first.wall.1, "the wall clock does not move");
    assert_eq!(first.mono_elapsed, 0, "nor the monotonic clock");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let skew = now.as_nanos().abs_diff(first.wall.0);
    assert!(
        skew < Duration::from_secs(10).as_nanos(),
        "the event's time is the real time: {skew} ns off"
    );
    assert_ne!(first.random.0, first.random.1, "random bytes are random");

    std::thread::sleep(Duration::from_millis(5));
    let second = read(&mut conn);
    assert!(
        second.wall.0 >= first.wall.0 + Duration::from_millis(5).as_nanos(),
        "time moves on between events: {} then {}",
        first.wall.0,
        second.wall.0
    );
    assert_ne!(
        first.random, second.random,
        "each event draws its own bytes"
    );
}
