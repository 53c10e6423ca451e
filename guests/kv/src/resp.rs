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
    /// A whole command (its arguments are in the `args` given to
    /// [`parse`]) and how many bytes it used. No arguments means an empty
    /// inline line, to be skipped.
    Command(usize),
    /// More bytes are needed.
    Incomplete,
    /// The client broke the protocol; Redis replies with the error and
    /// closes the connection.
    Error(&'static str),
}

/// Parses the command at the start of `buf` into `args` (cleared first):
/// slices of `buf`, so nothing is copied or allocated per argument.
pub fn parse<'a>(buf: &'a [u8], args: &mut Vec<&'a [u8]>) -> Parsed {
    args.clear();
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf, args),
        Some(_) => parse_inline(buf, args),
    }
}

/// Reads `<int>\r\n` starting at `at`; returns the number and the index
/// after the line.
fn read_int_line(buf: &[u8], at: usize) -> Option<Result<(i64, usize), ()>> {
    let end = buf[at..].iter().position(|&b| b == b'\r')? + at;
    if end + 1 >= buf.len() {
        return None;
    }
    Some(parse_i64(&buf[at..end]).map(|n| (n, end + 2)).ok_or(()))
}

/// A decimal integer with an optional `-`, as `str::parse::<i64>` reads
/// it but without a `+` (lengths and counts never have one).
pub fn parse_i64(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    // Accumulated as a negative number, which reaches i64::MIN.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative { Some(n) } else { n.checked_neg() }
}

fn parse_multibulk<'a>(buf: &'a [u8], args: &mut Vec<&'a [u8]>) -> Parsed {
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
        return Parsed::Command(pos);
    }
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
        args.push(&buf[start..end]);
        pos = end + 2;
    }
    Parsed::Command(pos)
}

fn parse_inline<'a>(buf: &'a [u8], args: &mut Vec<&'a [u8]>) -> Parsed {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    args.extend(
        line.split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty()),
    );
    Parsed::Command(nl + 1)
}

/// Writes `n` in decimal without allocating.
fn decimal(buf: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
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
        if n < 0 {
            self.buf.push(b'-');
        }
        decimal(&mut self.buf, n.unsigned_abs());
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn bulk(&mut self, data: &[u8]) {
        self.buf.reserve(data.len() + 16);
        self.buf.push(b'$');
        decimal(&mut self.buf, data.len() as u64);
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
        decimal(&mut self.buf, len as u64);
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn nil_array(&mut self) {
        self.buf.extend_from_slice(b"*-1\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(buf: &[u8]) -> (Parsed, Vec<Vec<u8>>) {
        let mut args = Vec::new();
        let p = parse(buf, &mut args);
        (p, args.into_iter().map(<[u8]>::to_vec).collect())
    }

    #[test]
    fn multibulk_whole_and_split() {
        let cmd = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        assert_eq!(
            parsed(cmd),
            (
                Parsed::Command(cmd.len()),
                vec![b"GET".to_vec(), b"key".to_vec()]
            )
        );
        for cut in 0..cmd.len() {
            assert_eq!(parsed(&cmd[..cut]).0, Parsed::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn inline() {
        assert_eq!(
            parsed(b"PING\r\n"),
            (Parsed::Command(6), vec![b"PING".to_vec()])
        );
        assert_eq!(
            parsed(b"set a  b\n"),
            (
                Parsed::Command(9),
                vec![b"set".to_vec(), b"a".to_vec(), b"b".to_vec()]
            )
        );
        assert_eq!(parsed(b"\r\n"), (Parsed::Command(2), vec![]));
    }

    #[test]
    fn errors() {
        assert!(matches!(parsed(b"*x\r\n").0, Parsed::Error(_)));
        assert!(matches!(parsed(b"*1\r\n+GET\r\n").0, Parsed::Error(_)));
        assert!(matches!(parsed(b"*1\r\n$-5\r\n").0, Parsed::Error(_)));
    }

    #[test]
    fn integers_and_replies() {
        for n in [
            "0",
            "-0",
            "-1",
            "42",
            "007",
            "9223372036854775807",
            "-9223372036854775808",
        ] {
            assert_eq!(parse_i64(n.as_bytes()), n.parse().ok(), "{n}");
        }
        for bad in [
            "",
            "-",
            "+1",
            "1x",
            " 1",
            "9223372036854775808",
            "99999999999999999999",
        ] {
            assert_eq!(parse_i64(bad.as_bytes()), None, "{bad}");
        }
        let mut out = Out::default();
        out.int(-120);
        out.int(i64::MIN);
        out.bulk(b"hi");
        out.array(0);
        assert_eq!(
            out.buf,
            b":-120\r\n:-9223372036854775808\r\n$2\r\nhi\r\n*0\r\n"
        );
    }
}
