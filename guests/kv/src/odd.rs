//! kv-odd: kv with differences that a shadow swap must notice, for tests.
//! Everything else is kv, state format included.
//!
//! * `ECHO x` answers `x` reversed: a divergence on one command.
//! * `ODD-TRAP` traps (kv answers it with an unknown-command error).
//! * `ODD-SLOW` answers as kv does (an unknown-command error), and from then
//!   on every command costs this instance a few milliseconds of work: a
//!   shadow that cannot keep up.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::commands::{After, Call};

/// Set by `ODD-SLOW` (the instance's own, not part of the state).
static SLOW: AtomicBool = AtomicBool::new(false);

/// Handles what kv-odd does differently; `None` leaves the command to kv.
pub fn execute(call: &mut Call, name: &[u8]) -> Option<After> {
    if SLOW.load(Ordering::Relaxed) {
        burn();
    }
    match name {
        b"echo" if call.args.len() == 2 => {
            let mut reversed = call.args[1].to_vec();
            reversed.reverse();
            call.out.bulk(&reversed);
            Some(After::Continue)
        }
        b"odd-trap" => panic!("kv-odd: ODD-TRAP"),
        b"odd-slow" => {
            SLOW.store(true, Ordering::Relaxed);
            None
        }
        _ => None,
    }
}

/// A few milliseconds of work that the optimiser cannot remove (time does
/// not advance inside a guest call, so it cannot sleep by the clock).
fn burn() {
    let mut x = 0u64;
    for i in 0..4_000_000u64 {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    std::hint::black_box(x);
}
