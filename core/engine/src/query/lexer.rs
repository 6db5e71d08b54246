//! Tokens of the query dialect, each with its byte offset in the query text.

use serde_json::Number;

use super::ParseError;

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// An identifier or keyword (keywords are recognised by the parser, case-insensitively).
    Ident(String),
    /// `[[name]]`: a name that would otherwise be a keyword or not an identifier.
    Escaped(String),
    /// A quoted string, escapes resolved.
    Str(String),
    /// A number.
    Num(Number),
    /// Punctuation or an operator.
    Sym(&'static str),
    /// End of the query.
    Eof,
}

impl Tok {
    /// How the token is named in "expected ..., found ..." messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::Escaped(s) => format!("'[[{s}]]'"),
            Tok::Str(s) => format!("the string '{s}'"),
            Tok::Num(n) => format!("the number {n}"),
            Tok::Sym(s) => format!("'{s}'"),
            Tok::Eof => "the end of the query".to_owned(),
        }
    }
}

const SYMBOLS: [&str; 18] =
    ["!=", "<>", "<=", ">=", "*", ",", ".", "(", ")", "[", "]", "=", "<", ">", "+", "-", "/", "%"];

/// Splits `src` into tokens; the last one is always [`Tok::Eof`].
pub(crate) fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_alphabetic() || c == b'_' || c == b'$' {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
            {
                i += 1;
            }
            out.push((Tok::Ident(src[start..i].to_owned()), start));
        } else if c.is_ascii_digit() {
            let (n, end) = number(src, start)?;
            out.push((Tok::Num(n), start));
            i = end;
        } else if c == b'\'' || c == b'"' {
            let (s, end) = string(src, start)?;
            out.push((Tok::Str(s), start));
            i = end;
        } else if let Some((name, end)) = escaped_name(src, start) {
            out.push((Tok::Escaped(name), start));
            i = end;
        } else if let Some(sym) = SYMBOLS.iter().find(|s| src[start..].starts_with(**s)) {
            out.push((Tok::Sym(sym), start));
            i += sym.len();
        } else {
            let ch = src[start..].chars().next().unwrap_or('?');
            let hint = if ch == '&' || ch == '|' { " (use AND / OR)" } else { "" };
            return Err(ParseError::at(src, start, format!("unexpected character '{ch}'{hint}")));
        }
    }
    out.push((Tok::Eof, src.len()));
    Ok(out)
}

/// `[[name]]` where the name holds no brackets, quotes or commas (so `[[1]]`-like constants
/// inside IN lists are not mistaken for names unless they look like one).
fn escaped_name(src: &str, start: usize) -> Option<(String, usize)> {
    let rest = src[start..].strip_prefix("[[")?;
    let close = rest.find("]]")?;
    let name = &rest[..close];
    if name.is_empty() || name.contains(['[', ']', '\'', '"', ',']) {
        return None;
    }
    Some((name.to_owned(), start + 2 + close + 2))
}

fn number(src: &str, start: usize) -> Result<(Number, usize), ParseError> {
    let bytes = src.as_bytes();
    let mut i = start;
    if src[start..].starts_with("0x") || src[start..].starts_with("0X") {
        i += 2;
        let digits_start = i;
        while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
            i += 1;
        }
        let digits = &src[digits_start..i];
        if digits.is_empty() {
            return Err(ParseError::at(src, start, "expected hexadecimal digits after '0x'".to_owned()));
        }
        let v = u64::from_str_radix(digits, 16)
            .map_err(|_| ParseError::at(src, start, format!("hexadecimal number 0x{digits} is too large")))?;
        return Ok((Number::from(v), i));
    }
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let mut integral = true;
    if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
        integral = false;
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            integral = false;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            i = j;
        }
    }
    if i < bytes.len() && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
        return Err(ParseError::at(src, start, format!("malformed number '{}'", word_at(src, start))));
    }
    let text = &src[start..i];
    let n = if integral { text.parse::<u64>().ok().map(Number::from) } else { None };
    let n = match n {
        Some(n) => n,
        None => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .ok_or_else(|| ParseError::at(src, start, format!("number '{text}' is out of range")))?,
    };
    Ok((n, i))
}

fn word_at(src: &str, start: usize) -> &str {
    let end = src[start..]
        .find(|c: char| c.is_whitespace() || "(),[]".contains(c))
        .map_or(src.len(), |e| start + e);
    &src[start..end]
}

fn string(src: &str, start: usize) -> Result<(String, usize), ParseError> {
    let quote = src.as_bytes()[start] as char;
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        let pos = start + 1 + off;
        if c == quote {
            return Ok((out, pos + 1));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some((_, e)) = chars.next() else { break };
        match e {
            '\'' | '"' | '\\' | '/' => out.push(e),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'u' => {
                let hex: String = chars.by_ref().take(4).map(|(_, h)| h).collect();
                let code = u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == 4);
                let Some(ch) = code.and_then(char::from_u32) else {
                    return Err(ParseError::at(
                        src,
                        pos,
                        format!("invalid escape '\\u{hex}': expected four hexadecimal digits of a character"),
                    ));
                };
                out.push(ch);
            }
            other => {
                return Err(ParseError::at(
                    src,
                    pos,
                    format!("unknown escape '\\{other}' in string (valid: \\' \\\" \\\\ \\uXXXX)"),
                ))
            }
        }
    }
    Err(ParseError::at(src, start, format!("unterminated string: missing closing {quote}")))
}
