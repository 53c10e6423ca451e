//! RESP2, the Redis wire protocol: request parsing (multibulk and inline
//! commands) and reply encoding.

/// Largest bulk argument accepted, as in Redis (`proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command line.
pub const MAX_INLINE: usize = 64 * 1024;

/// The outcome of parsing the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole command and how many bytes it used. An empty argument list
    /// means an empty inline line, to be skipped.
    Command(Vec<Vec<u8>>, usize),
    /// More bytes are needed.
    Incomplete,
    /// The client broke the protocol; Redis replies with the error and
    /// closes the connection.
    Error(&'static str),
}

pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

/// Reads `<int>\r\n` starting at `at`; returns the number and the index
/// after the line.
fn read_int_line(buf: &[u8], at: usize) -> Option<Result<(i64, usize), ()>> {
    let end = buf[at..].iter().position(|&b| b == b'\r')? + at;
    if end + 1 >= buf.len() {
        return None;
    }
    let n = std::str::from_utf8(&buf[at..end])
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    Some(n.map(|n| (n, end + 2)).ok_or(()))
}

fn parse_multibulk(buf: &[u8]) -> Parsed {
    let (count, mut pos) = match read_int_line(buf, 1) {
        None if buf.len() > 32 => return Parsed::Error("Protocol error: invalid multibulk length"),
        None => return Parsed::Incomplete,
        Some(Err(())) => return Parsed::Error("Protocol error: invalid multibulk length"),
        Some(Ok(v)) => v,
    };
    if count > MAX_ARGS as i64 {
        return Parsed::Error("Protocol error: invalid multibulk length");
    }
    if count <= 0 {
        return Parsed::Command(Vec::new(), pos);
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match buf.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("Protocol error: expected '$'"),
        }
        let (len, start) = match read_int_line(buf, pos + 1) {
            None if buf.len() - pos > 32 => {
                return Parsed::Error("Protocol error: invalid bulk length");
            }
            None => return Parsed::Incomplete,
            Some(Err(())) => return Parsed::Error("Protocol error: invalid bulk length"),
            Some(Ok(v)) => v,
        };
        if len < 0 || len as usize > MAX_BULK {
            return Parsed::Error("Protocol error: invalid bulk length");
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Parsed::Incomplete;
        }
        args.push(buf[start..end].to_vec());
        pos = end + 2;
    }
    Parsed::Command(args, pos)
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let args = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Parsed::Command(args, nl + 1)
}

/// Accumulates replies for one connection; sent once per `on-data`.
#[derive(Default)]
pub struct Out {
    pub buf: Vec<u8>,
}

impl Out {
    pub fn ok(&mut self) {
        self.buf.extend_from_slice(b"+OK\r\n");
    }

    pub fn simple(&mut self, s: &str) {
        self.buf.push(b'+');
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// An error reply; `msg` starts with its code, e.g. `ERR syntax error`.
    pub fn error(&mut self, msg: &str) {
        self.buf.push(b'-');
        self.buf.extend_from_slice(msg.as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn int(&mut self, n: i64) {
        self.buf.push(b':');
        self.buf.extend_from_slice(n.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn bulk(&mut self, data: &[u8]) {
        self.buf.push(b'$');
        self.buf
            .extend_from_slice(data.len().to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        self.buf.extend_from_slice(data);
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn nil(&mut self) {
        self.buf.extend_from_slice(b"$-1\r\n");
    }

    pub fn opt_bulk(&mut self, data: Option<&[u8]>) {
        match data {
            Some(d) => self.bulk(d),
            None => self.nil(),
        }
    }

    pub fn array(&mut self, len: usize) {
        self.buf.push(b'*');
        self.buf.extend_from_slice(len.to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn nil_array(&mut self) {
        self.buf.extend_from_slice(b"*-1\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibulk_whole_and_split() {
        let cmd = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        assert_eq!(
            parse(cmd),
            Parsed::Command(vec![b"GET".to_vec(), b"key".to_vec()], cmd.len())
        );
        for cut in 0..cmd.len() {
            assert_eq!(parse(&cmd[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn inline() {
        assert_eq!(
            parse(b"PING\r\n"),
            Parsed::Command(vec![b"PING".to_vec()], 6)
        );
        assert_eq!(
            parse(b"set a  b\n"),
            Parsed::Command(vec![b"set".to_vec(), b"a".to_vec(), b"b".to_vec()], 9)
        );
        assert_eq!(parse(b"\r\n"), Parsed::Command(vec![], 2));
    }

    #[test]
    fn errors() {
        assert!(matches!(parse(b"*x\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n+GET\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n$-5\r\n"), Parsed::Error(_)));
    }
}
