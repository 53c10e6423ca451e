//! A connection's unconsumed input.

/// The bytes a connection sent that the service has not consumed yet: what
/// was left after earlier events, then the new ones. Taking a request
/// consumes it; whatever is left when [`Service::on_data`](crate::Service::on_data)
/// returns is kept for the next event (and travels with the state in a swap).
pub struct Input<'a> {
    buf: &'a mut Vec<u8>,
    pos: usize,
}

impl<'a> Input<'a> {
    pub(crate) fn new(buf: &'a mut Vec<u8>) -> Input<'a> {
        Input { buf, pos: 0 }
    }

    /// Drops the consumed bytes from the buffer.
    pub(crate) fn finish(self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
        }
    }

    /// The unconsumed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// How many bytes are unconsumed.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the first `n` unconsumed bytes as used (at most all of them).
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Consumes everything (for example after an input error).
    pub fn clear(&mut self) {
        self.pos = self.buf.len();
    }

    /// Takes the next whole line: the bytes up to a `\n`, without it and
    /// without a `\r` before it. `None` until a `\n` has arrived.
    pub fn line(&mut self) -> Option<&[u8]> {
        let start = self.pos;
        let nl = self.buf[start..].iter().position(|&b| b == b'\n')?;
        self.pos = start + nl + 1;
        let line = &self.buf[start..start + nl];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// Takes the next `len` bytes, once that many have arrived.
    pub fn frame(&mut self, len: usize) -> Option<&[u8]> {
        if self.len() < len {
            return None;
        }
        let start = self.pos;
        self.pos += len;
        Some(&self.buf[start..start + len])
    }

    /// Takes a frame that starts with a big-endian `u32` length (the
    /// length counts the bytes after it); returns the body.
    pub fn length_prefixed(&mut self) -> Option<&[u8]> {
        let head: [u8; 4] = self.bytes().get(..4)?.try_into().ok()?;
        let len = u32::from_be_bytes(head) as usize;
        if self.len() < 4 + len {
            return None;
        }
        self.consume(4);
        self.frame(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_frames_and_what_is_left() {
        let mut buf = b"one\r\ntwo\nthr".to_vec();
        let mut input = Input::new(&mut buf);
        assert_eq!(input.line(), Some(&b"one"[..]));
        assert_eq!(input.line(), Some(&b"two"[..]));
        assert_eq!(input.line(), None);
        assert_eq!(input.bytes(), b"thr");
        input.finish();
        assert_eq!(buf, b"thr");

        buf.extend_from_slice(b"ee\n\0\0\0\x02hi\0\0");
        let mut input = Input::new(&mut buf);
        assert_eq!(input.line(), Some(&b"three"[..]));
        assert_eq!(input.length_prefixed(), Some(&b"hi"[..]));
        assert_eq!(input.length_prefixed(), None, "a partial header waits");
        assert_eq!(input.frame(3), None);
        assert_eq!(input.frame(2), Some(&b"\0\0"[..]));
        assert!(input.is_empty());
        input.finish();
        assert!(buf.is_empty());
    }
}
