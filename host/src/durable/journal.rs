//! The journal: every event delivered since the last snapshot, with its
//! stamp, in order; and its on-disk record format.
//!
//! A record is
//!
//! ```text
//! len      u32 LE   bytes after this field and the checksum (kind .. payload)
//! crc      u32 LE   CRC-32 (IEEE) of those bytes
//! kind     u8       1 connect, 2 data, 3 close, 4 timer
//! wall_ns  u64 LE   the event's stamp: wall clock,
//! mono_ns  u64 LE   monotonic clock,
//! seq      u64 LE   sequence number
//! payload           connect: conn u64, listener (u32 len + bytes), peer (u32 len + bytes)
//!                   data:    conn u64, bytes (u32 len + bytes)
//!                   close:   conn u64
//!                   timer:   token u64
//! ```
//!
//! Reading stops at the first record that does not check: at the end of the
//! data it is a torn write (the crash interrupted it) and is reported as
//! such; anywhere else it is corruption.

use crate::service::Stamp;

/// An event as the journal keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Connect {
        conn: u64,
        listener: String,
        peer: String,
    },
    Data(u64, Vec<u8>),
    Close(u64),
    Timer(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub stamp: Stamp,
    pub event: Event,
}

/// Most bytes one record may hold (a data event carries at most one read,
/// `--read-chunk`, which is far below this).
pub const MAX_RECORD: usize = 64 << 20;

const HEAD: usize = 8;

/// An event borrowed from where it is delivered, to be recorded without a
/// copy.
#[derive(Clone, Copy, Debug)]
pub enum EventRef<'a> {
    Connect {
        conn: u64,
        listener: &'a str,
        peer: &'a str,
    },
    Data(u64, &'a [u8]),
    Close(u64),
    Timer(u64),
}

impl Event {
    pub fn as_ref(&self) -> EventRef<'_> {
        match self {
            Event::Connect {
                conn,
                listener,
                peer,
            } => EventRef::Connect {
                conn: *conn,
                listener,
                peer,
            },
            Event::Data(conn, data) => EventRef::Data(*conn, data),
            Event::Close(conn) => EventRef::Close(*conn),
            Event::Timer(token) => EventRef::Timer(*token),
        }
    }
}

impl Record {
    /// Appends the record's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode(out, self.stamp, self.event.as_ref());
    }
}

/// How many bytes [`encode`] appends for `event`.
pub fn encoded_len(event: EventRef<'_>) -> usize {
    let payload = match event {
        EventRef::Connect { listener, peer, .. } => 8 + 4 + listener.len() + 4 + peer.len(),
        EventRef::Data(_, data) => 8 + 4 + data.len(),
        EventRef::Close(_) | EventRef::Timer(_) => 8,
    };
    HEAD + 1 + 24 + payload
}

/// Appends the record of `event` with `stamp` to `out`.
pub fn encode(out: &mut Vec<u8>, stamp: Stamp, event: EventRef<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEAD]);
    let kind = match event {
        EventRef::Connect { .. } => 1,
        EventRef::Data(..) => 2,
        EventRef::Close(_) => 3,
        EventRef::Timer(_) => 4,
    };
    let body_start = out.len();
    out.push(kind);
    out.extend_from_slice(&stamp.wall_ns.to_le_bytes());
    out.extend_from_slice(&stamp.mono_ns.to_le_bytes());
    out.extend_from_slice(&stamp.seq.to_le_bytes());
    match event {
        EventRef::Connect {
            conn,
            listener,
            peer,
        } => {
            out.extend_from_slice(&conn.to_le_bytes());
            put_bytes(out, listener.as_bytes());
            put_bytes(out, peer.as_bytes());
        }
        EventRef::Data(conn, data) => {
            out.extend_from_slice(&conn.to_le_bytes());
            put_bytes(out, data);
        }
        EventRef::Close(conn) => out.extend_from_slice(&conn.to_le_bytes()),
        EventRef::Timer(token) => out.extend_from_slice(&token.to_le_bytes()),
    }
    let body = &out[body_start..];
    let len = (body.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(body).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + HEAD].copy_from_slice(&crc);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Why reading stopped before the end of the data.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The last record is incomplete or does not check and nothing follows
    /// it: a write the crash interrupted. Safe to drop.
    Torn { offset: usize },
    /// A record that does not check, with more data after it.
    Corrupt { offset: usize, why: String },
}

/// Reads every record of `data`; returns them and, if reading stopped
/// early, why.
pub fn read(data: &[u8]) -> (Vec<Record>, Option<Stop>) {
    let mut records = Vec::new();
    let mut at = 0;
    while at < data.len() {
        match read_one(&data[at..]) {
            Ok((record, used)) => {
                records.push(record);
                at += used;
            }
            Err(why) => {
                let stop = match torn_at_end(&data[at..]) {
                    true => Stop::Torn { offset: at },
                    false => Stop::Corrupt { offset: at, why },
                };
                return (records, Some(stop));
            }
        }
    }
    (records, None)
}

/// Whether the bytes from a failed record to the end can be one record cut
/// short or damaged in its last write: its stated length reaches the end
/// of the data (or the head itself is cut).
///
/// Known gap: a bit flip in a middle record's length field that makes it
/// reach past the end looks the same, and would drop the records after it
/// as torn. To do: let the writer pad each batch to a block boundary with a
/// batch trailer, so that "torn" means "after the last complete batch".
fn torn_at_end(rest: &[u8]) -> bool {
    if rest.len() < HEAD {
        return true;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    HEAD + len >= rest.len()
}

fn read_one(data: &[u8]) -> Result<(Record, usize), String> {
    if data.len() < HEAD {
        return Err("a record head is cut".into());
    }
    let len = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(data[4..HEAD].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Err(format!("a record of {len} bytes is over the limit"));
    }
    let body = data
        .get(HEAD..HEAD + len)
        .ok_or_else(|| format!("a record of {len} bytes is cut"))?;
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let mut r = Cursor { buf: body, at: 0 };
    let kind = r.u8()?;
    let stamp = Stamp {
        wall_ns: r.u64()?,
        mono_ns: r.u64()?,
        seq: r.u64()?,
    };
    let event = match kind {
        1 => Event::Connect {
            conn: r.u64()?,
            listener: r.string()?,
            peer: r.string()?,
        },
        2 => Event::Data(r.u64()?, r.bytes()?.to_vec()),
        3 => Event::Close(r.u64()?),
        4 => Event::Timer(r.u64()?),
        other => return Err(format!("unknown record kind {other}")),
    };
    if r.at != body.len() {
        return Err(format!("{} bytes after the record", body.len() - r.at));
    }
    Ok((Record { stamp, event }, HEAD + len))
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("record cut at byte {}", self.at))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4")) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a name is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        let stamp = |seq| Stamp {
            wall_ns: 1_000 + seq,
            mono_ns: 2_000 + seq,
            seq,
        };
        vec![
            Record {
                stamp: stamp(1),
                event: Event::Connect {
                    conn: 7,
                    listener: "default".into(),
                    peer: "127.0.0.1:5000".into(),
                },
            },
            Record {
                stamp: stamp(2),
                event: Event::Data(7, b"SET k v\r\n".to_vec()),
            },
            Record {
                stamp: stamp(3),
                event: Event::Timer(1),
            },
            Record {
                stamp: stamp(4),
                event: Event::Close(7),
            },
        ]
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        records.iter().for_each(|r| r.encode(&mut out));
        out
    }

    #[test]
    fn round_trip() {
        let records = sample();
        assert_eq!(read(&encode(&records)), (records, None));
    }

    #[test]
    fn a_journal_cut_anywhere_in_its_last_record_is_torn_not_corrupt() {
        let records = sample();
        let full = encode(&records);
        let last_start = encode(&records[..3]).len();
        for cut in last_start..full.len() {
            let (got, stop) = read(&full[..cut]);
            assert_eq!(got, records[..3], "cut at {cut}");
            match cut == last_start {
                true => assert_eq!(stop, None),
                false => assert_eq!(stop, Some(Stop::Torn { offset: last_start })),
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_corruption() {
        let records = sample();
        let mut data = encode(&records);
        let second = encode(&records[..1]).len();
        data[second + HEAD + 3] ^= 0x40;
        let (got, stop) = read(&data);
        assert_eq!(got, records[..1]);
        assert!(
            matches!(stop, Some(Stop::Corrupt { offset, .. }) if offset == second),
            "{stop:?}"
        );
    }

    fn event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<u64>(), ".{0,10}", ".{0,20}").prop_map(|(conn, listener, peer)| {
                Event::Connect {
                    conn,
                    listener,
                    peer,
                }
            }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(c, d)| Event::Data(c, d)),
            any::<u64>().prop_map(Event::Close),
            any::<u64>().prop_map(Event::Timer),
        ]
    }

    fn records() -> impl proptest::strategy::Strategy<Value = Vec<Record>> {
        use proptest::prelude::*;
        proptest::collection::vec(
            (any::<u64>(), any::<u64>(), any::<u64>(), event()).prop_map(
                |(wall_ns, mono_ns, seq, event)| Record {
                    stamp: Stamp {
                        wall_ns,
                        mono_ns,
                        seq,
                    },
                    event,
                },
            ),
            0..12,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            // What is read back is exactly a prefix of the bytes.
            let (got, stop) = read(&bytes);
            let prefix = encode(&got);
            proptest::prop_assert_eq!(&bytes[..prefix.len()], &prefix[..]);
            proptest::prop_assert_eq!(stop.is_none(), prefix.len() == bytes.len());
        }

        #[test]
        fn records_round_trip_and_any_cut_keeps_a_prefix(records in records(), cut in proptest::prelude::any::<proptest::sample::Index>()) {
            let data = encode(&records);
            proptest::prop_assert_eq!(read(&data), (records.clone(), None));
            let cut = cut.index(data.len() + 1);
            let (got, stop) = read(&data[..cut]);
            proptest::prop_assert!(records.starts_with(&got));
            // A cut inside the last record read is torn, never corrupt.
            proptest::prop_assert!(!matches!(stop, Some(Stop::Corrupt { .. })), "{:?}", stop);
        }

        #[test]
        fn garbage_after_records_is_caught(records in records(), tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40)) {
            let mut data = encode(&records);
            data.extend_from_slice(&tail);
            let (got, stop) = read(&data);
            proptest::prop_assert!(records.iter().zip(&got).all(|(a, b)| a == b));
            proptest::prop_assert!(got.len() >= records.len());
            if got.len() == records.len() {
                proptest::prop_assert!(stop.is_some());
            }
        }
    }
}
