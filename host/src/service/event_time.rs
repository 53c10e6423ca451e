//! Time and randomness per event: the only inputs of a guest that do not
//! come through its events.
//!
//! The host provides WASI's clocks and random generators itself. Each guest
//! call (an event, `init`, a state export or import) gets a [`Stamp`]: the
//! wall-clock time at which the host began it and its sequence number in
//! the instance. During the call:
//!
//! * `wasi:clocks/wall-clock.now` returns the stamp's time, every time:
//!   time does not advance inside a call (as in Cloudflare Workers), so a
//!   guest that measures how long its own work takes measures zero;
//! * `wasi:clocks/monotonic-clock.now` returns the same instant in
//!   nanoseconds since the Unix epoch, never less than in an earlier call
//!   of the instance (a wall clock stepped back leaves it where it was), so
//!   it is monotonic within an instance and continues across swaps and host
//!   upgrades;
//! * `wasi:random/random` and `wasi:random/insecure` return bytes from a
//!   ChaCha12 generator seeded with SHA-256 of the instance's secret key and
//!   the call's sequence number: unpredictable without the key, and the
//!   same bytes again for the same key and sequence number;
//! * `wasi:random/insecure-seed` returns a value derived from the key, the
//!   same for the instance's whole life (language runtimes read it once to
//!   seed their hash tables).
//!
//! So a call's outcome is a function of the guest's state, the event and
//! its stamp. That is what lets a journal of stamped events be replayed
//! onto a snapshot and rebuild exactly the state the instance had (the
//! durable-state work: the journal records each event's stamp, and the key
//! moves with the snapshot).
//!
//! Sleeping (`subscribe-duration`) still waits real time, within the call's
//! deadline.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// When a call happened, and which call of its instance it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub wall_ns: u64,
    /// The monotonic clock's reading: `wall_ns`, or more when the wall
    /// clock stepped back since an earlier call of the instance.
    pub mono_ns: u64,
    /// The call's sequence number in its instance, from 1.
    pub seq: u64,
}

/// The clocks and generators of one instance, set at the start of each
/// call. Cloned into the store's WASI context (clocks and generators) and
/// kept by the instance (which begins each call).
#[derive(Clone)]
pub struct EventTime {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    key: [u8; 32],
    stamp: Stamp,
    /// The call's generator, made when the guest first asks for random
    /// bytes in the call (most calls never do; seeding costs a SHA-256).
    rng: Option<StdRng>,
}

impl Inner {
    fn rng(&mut self) -> &mut StdRng {
        let (key, seq) = (self.key, self.stamp.seq);
        self.rng.get_or_insert_with(|| rng_for(&key, seq))
    }
}

impl EventTime {
    /// A new instance's clocks, with a fresh random key.
    pub fn new() -> EventTime {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system's random source");
        EventTime::with_key(key)
    }

    /// Clocks whose random bytes derive from `key` (a replay uses the key of
    /// the instance it rebuilds).
    pub fn with_key(key: [u8; 32]) -> EventTime {
        let stamp = Stamp {
            wall_ns: 0,
            mono_ns: 0,
            seq: 0,
        };
        EventTime {
            inner: Arc::new(Mutex::new(Inner {
                key,
                stamp,
                rng: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it leaves plain numbers behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instance's secret key (a rebuilt instance gets the same one).
    pub fn key(&self) -> [u8; 32] {
        self.lock().key
    }

    /// The stamp of a call beginning now: the current wall-clock time, the
    /// monotonic reading (never less than the last call's) and the next
    /// sequence number.
    pub fn next(&self) -> Stamp {
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let last = self.lock().stamp;
        Stamp {
            wall_ns,
            mono_ns: last.mono_ns.max(wall_ns),
            seq: last.seq + 1,
        }
    }

    /// Begins a call with `stamp`: from now until the next `begin`, the
    /// clocks read its time and the generators give its bytes. A replay
    /// begins each call with the stamp the journal recorded for it.
    pub fn begin(&self, stamp: Stamp) {
        let mut inner = self.lock();
        inner.rng = None;
        inner.stamp = stamp;
    }

    /// Makes the next call's stamp come after `last` (a rebuilt instance
    /// goes on after the instance it replaces, whose last calls may not
    /// have been replayed).
    pub fn advance_past(&self, last: Stamp) {
        let mut inner = self.lock();
        let stamp = &mut inner.stamp;
        stamp.seq = stamp.seq.max(last.seq);
        stamp.mono_ns = stamp.mono_ns.max(last.mono_ns);
    }

    /// The stamp of the call in progress (or of the last one).
    pub fn stamp(&self) -> Stamp {
        self.lock().stamp
    }

    /// The value `wasi:random/insecure-seed` returns, fixed per key.
    pub fn insecure_seed(&self) -> u128 {
        let digest = Sha256::new()
            .chain_update(self.lock().key)
            .chain_update(b"insecure-seed")
            .finalize();
        u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"))
    }

    /// `wasi:clocks/wall-clock` for the store.
    pub fn wall_clock(&self) -> impl HostWallClock + 'static {
        WallClock(self.clone())
    }

    /// `wasi:clocks/monotonic-clock` for the store.
    pub fn monotonic_clock(&self) -> impl HostMonotonicClock + 'static {
        MonotonicClock(self.clone())
    }

    /// A `wasi:random` generator for the store (both the secure and the
    /// insecure interface draw from the one per-call stream).
    pub fn random(&self) -> Random {
        Random(self.clone())
    }
}

impl Default for EventTime {
    fn default() -> Self {
        EventTime::new()
    }
}

fn rng_for(key: &[u8; 32], seq: u64) -> StdRng {
    let seed: [u8; 32] = Sha256::new()
        .chain_update(key)
        .chain_update(seq.to_le_bytes())
        .finalize()
        .into();
    StdRng::from_seed(seed)
}

struct WallClock(EventTime);

impl HostWallClock for WallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.lock().stamp.wall_ns)
    }
}

struct MonotonicClock(EventTime);

impl HostMonotonicClock for MonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.0.lock().stamp.mono_ns
    }
}

/// The per-call generator, as WASI's `Rng`.
pub struct Random(EventTime);

impl rand::TryRng for Random {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.0.lock().rng().try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0.lock().rng().try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.lock().rng().try_fill_bytes(dst)
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn time_stands_still_within_a_call_and_never_goes_back() {
        let time = EventTime::with_key([7; 32]);
        let wall = time.wall_clock();
        let mono = time.monotonic_clock();
        let first = time.next();
        time.begin(first);
        assert_eq!(wall.now(), Duration::from_nanos(first.wall_ns));
        assert_eq!(mono.now(), first.wall_ns);
        assert_eq!(mono.now(), first.wall_ns, "no time passes inside a call");
        // A call whose monotonic reading ran ahead of the wall clock (the
        // wall clock stepped back since): the next reading does not go back.
        let ahead = first.wall_ns + 3_600_000_000_000;
        time.begin(Stamp {
            wall_ns: first.wall_ns,
            mono_ns: ahead,
            seq: 2,
        });
        assert_eq!(mono.now(), ahead);
        let next = time.next();
        assert!(next.wall_ns < ahead);
        assert_eq!(next.mono_ns, ahead);
        assert_eq!(time.next().seq, 3);
    }

    #[test]
    fn random_bytes_repeat_for_the_same_key_and_call() {
        let draw = |key: [u8; 32], seq: u64| {
            let time = EventTime::with_key(key);
            time.begin(Stamp {
                wall_ns: 1,
                mono_ns: 1,
                seq,
            });
            let mut random = time.random();
            let mut bytes = [0u8; 16];
            random.fill_bytes(&mut bytes);
            (bytes, random.next_u64())
        };
        assert_eq!(draw([1; 32], 9), draw([1; 32], 9));
        assert_ne!(draw([1; 32], 9), draw([1; 32], 10), "each call its own");
        assert_ne!(draw([1; 32], 9), draw([2; 32], 9), "each key its own");
        assert_eq!(
            EventTime::with_key([3; 32]).insecure_seed(),
            EventTime::with_key([3; 32]).insecure_seed()
        );
    }
}
