//! State formats: how a service's state moves to another version.
//!
//! A format is a name with a version (`kv/1`) and a documented,
//! language-neutral layout, so that the next version, possibly written in
//! another language, can read it. A service lists its formats once in
//! [`Service::formats`](crate::Service::formats), most preferred first; the
//! SDK answers the host's `importable()` and `exportable()` from that list,
//! rejects formats not in it with a clear error, and hands each
//! connection's unconsumed input ([`Pending`]) to the export functions and
//! back from the import functions, so a half-received request is completed
//! by the next version.
//!
//! Make export deterministic: importing a state and exporting it again
//! should give the same bytes (`wasmhost check` tests this, and
//! `swap --validate roundtrip` relies on it). Iterate in an order the import
//! restores, e.g. an insertion-ordered map, not a `HashMap`.

use std::collections::BTreeMap;

use crate::ConnId;

/// Each open connection's unconsumed input, by connection id (every open
/// connection has an entry, possibly empty).
pub type Pending = BTreeMap<ConnId, Vec<u8>>;

/// Writes the state in one format.
pub type ExportFn<S> = fn(&S, &Pending) -> Result<Vec<u8>, String>;
/// Reads the state from one format. The state's buffer is handed over, so
/// a service may keep its data where it is instead of copying it (kv keeps
/// its keys and values in it).
pub type ImportFn<S> = fn(Vec<u8>) -> Result<(S, Pending), String>;

struct Format<S> {
    name: &'static str,
    export: Option<ExportFn<S>>,
    import: Option<ImportFn<S>>,
    /// When set, the format is exportable only while this holds (for a
    /// newer version that can write an older format while its state fits).
    offered_while: Option<fn(&S) -> bool>,
}

/// The formats a service exports and imports, most preferred first.
pub struct Formats<S> {
    list: Vec<Format<S>>,
}

impl<S> Default for Formats<S> {
    fn default() -> Self {
        Formats::new()
    }
}

impl<S> Formats<S> {
    /// No formats: the service cannot hand its state on (a swap then needs
    /// `--fresh`).
    pub fn new() -> Formats<S> {
        Formats { list: Vec::new() }
    }

    /// A format this version both exports and imports.
    pub fn format(self, name: &'static str, export: ExportFn<S>, import: ImportFn<S>) -> Self {
        self.push(name, Some(export), Some(import))
    }

    /// A format this version only exports (an older one, for rollback).
    pub fn export_only(self, name: &'static str, export: ExportFn<S>) -> Self {
        self.push(name, Some(export), None)
    }

    /// A format this version only imports (an older one it upgrades from).
    pub fn import_only(self, name: &'static str, import: ImportFn<S>) -> Self {
        self.push(name, None, Some(import))
    }

    /// Offers the format added last for export only while `holds` is true.
    pub fn offered_while(mut self, holds: fn(&S) -> bool) -> Self {
        if let Some(last) = self.list.last_mut() {
            last.offered_while = Some(holds);
        }
        self
    }

    fn push(
        mut self,
        name: &'static str,
        export: Option<ExportFn<S>>,
        import: Option<ImportFn<S>>,
    ) -> Self {
        assert!(
            self.list.iter().all(|f| f.name != name),
            "state format {name} registered twice"
        );
        self.list.push(Format {
            name,
            export,
            import,
            offered_while: None,
        });
        self
    }

    /// `migrate.importable()`.
    pub fn importable(&self) -> Vec<String> {
        let names = self.list.iter().filter(|f| f.import.is_some());
        names.map(|f| f.name.to_string()).collect()
    }

    /// `migrate.exportable()` for this state.
    pub fn exportable(&self, service: &S) -> Vec<String> {
        self.list
            .iter()
            .filter(|f| f.export.is_some() && f.offered_while.is_none_or(|holds| holds(service)))
            .map(|f| f.name.to_string())
            .collect()
    }

    /// `migrate.export-state(format)`.
    pub fn export(&self, service: &S, pending: &Pending, format: &str) -> Result<Vec<u8>, String> {
        if !self.exportable(service).iter().any(|f| f == format) {
            return Err(format!(
                "cannot export {format}: this version exports [{}] now",
                self.exportable(service).join(", ")
            ));
        }
        let export = self
            .find(format)
            .and_then(|f| f.export)
            .expect("checked above");
        export(service, pending)
    }

    /// `migrate.import-state(format, state)`.
    pub fn import(&self, format: &str, state: Vec<u8>) -> Result<(S, Pending), String> {
        match self.find(format).and_then(|f| f.import) {
            Some(import) => import(state).map_err(|e| format!("invalid {format} state: {e}")),
            None => Err(format!(
                "cannot import {format}: this version imports [{}]",
                self.importable().join(", ")
            )),
        }
    }

    fn find(&self, format: &str) -> Option<&Format<S>> {
        self.list.iter().find(|f| f.name == format)
    }
}

/// Builds a binary state: little-endian integers and length-prefixed
/// byte strings (`u32` length, then the bytes).
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn with_capacity(bytes: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(bytes),
        }
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.raw(&[v])
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// A `u32` length, then the bytes. Panics past 4 GiB, which no state
    /// format of this kind can carry.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("a byte string over 4 GiB");
        self.u32(len).raw(v)
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads what a [`Writer`] wrote; every error names the byte offset.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Where the next read starts.
    pub fn offset(&self) -> usize {
        self.pos
    }

    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: {n} bytes needed at byte {}, {} left",
                self.pos,
                self.buf.len() - self.pos
            ));
        };
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// Expects exactly `magic` next.
    pub fn magic(&mut self, magic: &[u8]) -> Result<(), String> {
        let at = self.pos;
        match self.raw(magic.len()) {
            Ok(got) if got == magic => Ok(()),
            _ => Err(format!(
                "expected {:?} at byte {at}",
                String::from_utf8_lossy(magic)
            )),
        }
    }

    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.raw(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.raw(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.raw(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.raw(len)
    }

    /// A count of items about to be read, checked against the bytes left
    /// (each item takes at least `min_item_bytes`), so a corrupt count
    /// cannot make the importer reserve gigabytes.
    pub fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(format!(
                "count {n} at byte {at} is more than the {left} bytes left can hold"
            ));
        }
        Ok(n as usize)
    }

    /// Ends the read: an error if bytes are left over.
    pub fn finish(self) -> Result<(), String> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            left => Err(format!("{left} unexpected bytes after byte {}", self.pos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_agree_and_errors_name_the_offset() {
        let mut w = Writer::new();
        w.raw(b"KV/1").u64(2).bytes(b"key").u8(7).u32(9);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        r.magic(b"KV/1").unwrap();
        assert_eq!(r.count(1).unwrap(), 2);
        assert_eq!(r.bytes().unwrap(), b"key");
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 9);
        r.finish().unwrap();

        let mut r = Reader::new(b"KV/2");
        assert_eq!(r.magic(b"KV/1").unwrap_err(), "expected \"KV/1\" at byte 0");
        let mut r = Reader::new(b"\xff\xff\xff\xff\xff\xff\xff\x7f");
        assert!(r.count(1).unwrap_err().contains("at byte 0"));
        let mut r = Reader::new(b"\x05\0\0\0ab");
        assert_eq!(
            r.bytes().unwrap_err(),
            "truncated: 5 bytes needed at byte 4, 2 left"
        );
    }
}
