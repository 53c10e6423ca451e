//! IRC message lines (RFC 2812 section 2.3): parsing and validation.

/// A parsed client message. The prefix, if any, is ignored: a client's
/// prefix is its own nick, which the server knows better.
#[derive(Debug, PartialEq)]
pub struct Message {
    pub command: String,
    pub params: Vec<String>,
}

/// Parses one line (without its line ending). `None` for an empty line.
pub fn parse(line: &str) -> Option<Message> {
    let mut rest = line.trim_start_matches(' ');
    if let Some(after) = rest.strip_prefix(':') {
        rest = after
            .split_once(' ')
            .map_or("", |(_, r)| r)
            .trim_start_matches(' ');
    }
    let mut params = Vec::new();
    let (command, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
    if command.is_empty() {
        return None;
    }
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        if let Some(trailing) = rest.strip_prefix(':') {
            params.push(trailing.to_string());
            break;
        }
        let (param, next) = rest.split_once(' ').unwrap_or((rest, ""));
        params.push(param.to_string());
        rest = next;
    }
    Some(Message {
        command: command.to_ascii_uppercase(),
        params,
    })
}

/// RFC 2812 nickname: a letter or special first, then letters, digits,
/// specials or `-`; at most 30 characters here.
pub fn valid_nick(nick: &str) -> bool {
    let special = |c: char| "[]\\`_^{|}".contains(c);
    let mut chars = nick.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    nick.len() <= 30
        && (first.is_ascii_alphabetic() || special(first))
        && chars.all(|c| c.is_ascii_alphanumeric() || special(c) || c == '-')
}

/// `#name` or `&name`, at most 50 characters, without space, comma or
/// control characters.
pub fn valid_channel(name: &str) -> bool {
    (name.starts_with('#') || name.starts_with('&'))
        && name.len() > 1
        && name.len() <= 50
        && !name.chars().any(|c| c == ' ' || c == ',' || c.is_control())
}

/// Case-insensitive key for nicks and channel names.
pub fn fold(name: &str) -> String {
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let m = parse(":alice PRIVMSG #rust :hello there").unwrap();
        assert_eq!(m.command, "PRIVMSG");
        assert_eq!(m.params, vec!["#rust", "hello there"]);
        let m = parse("user bob 0 * :Bob B").unwrap();
        assert_eq!(m.command, "USER");
        assert_eq!(m.params, vec!["bob", "0", "*", "Bob B"]);
        assert_eq!(parse("   "), None);
    }

    #[test]
    fn names() {
        assert!(valid_nick("alice"));
        assert!(valid_nick("[bot]-1"));
        assert!(!valid_nick("1abc"));
        assert!(!valid_nick(""));
        assert!(valid_channel("#rust"));
        assert!(!valid_channel("rust"));
        assert!(!valid_channel("#a,b"));
    }
}
