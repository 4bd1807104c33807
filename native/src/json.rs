//! A strict reader of one JSON object: the values of the fields an event can carry.
//!
//! It answers only for input it is sure of. Anything else (not UTF-8, not an object, not valid
//! JSON by RFC 8259, a known field given twice, an integer beyond 64 bits, a lone surrogate,
//! nesting deeper than `MAX_DEPTH`) gives `None`, and the caller hands the line to the Python
//! parser, which decides and names the dead-letter reason. So every object this reader accepts
//! is one `orjson.loads` decodes to the same values.

use std::borrow::Cow;

/// A JSON value as validation looks at it; arrays and objects are only checked and skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool,
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Nested,
}

/// The fields read, in this order (see `field_index`).
pub const FIELDS: [&str; 16] = [
    "type", "event_id", "member_id", "ts", "amount", "points", "margin", "value", "channel",
    "tier", "nps", "csat", "comment", "store_id", "currency", "reward_id",
];

pub const TYPE: usize = 0;
pub const EVENT_ID: usize = 1;
pub const MEMBER_ID: usize = 2;
pub const TS: usize = 3;
pub const AMOUNT: usize = 4;
pub const POINTS: usize = 5;
pub const MARGIN: usize = 6;
pub const VALUE: usize = 7;
pub const CHANNEL: usize = 8;
pub const TIER: usize = 9;
pub const NPS: usize = 10;
pub const CSAT: usize = 11;
pub const COMMENT: usize = 12;
pub const STORE_ID: usize = 13;
pub const CURRENCY: usize = 14;
pub const REWARD_ID: usize = 15;

const MAX_DEPTH: usize = 64;

pub fn field_index(name: &str) -> Option<usize> {
    FIELDS.iter().position(|field| *field == name)
}

/// The known fields of a JSON object; a field that is absent or null is `None`.
pub type Fields<'a> = [Option<Value<'a>>; 16];

/// The known fields of `raw`, a JSON object, or `None` when not sure (see the module doc).
pub fn read_object(raw: &[u8]) -> Option<Fields<'_>> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut reader = Reader { bytes: text.as_bytes(), text, at: 0 };
    let mut fields: Fields = Default::default();
    let mut given = [false; 16];
    reader.skip_ws();
    reader.expect(b'{')?;
    reader.skip_ws();
    if reader.peek()? == b'}' {
        reader.at += 1;
    } else {
        loop {
            reader.skip_ws();
            reader.expect(b'"')?;
            let key = reader.string_body()?;
            reader.skip_ws();
            reader.expect(b':')?;
            reader.skip_ws();
            let value = reader.value(0)?;
            if let Some(index) = field_index(&key) {
                if given[index] {
                    return None; // a repeated field: leave its meaning to the reference parser
                }
                given[index] = true;
                if value != Value::Null {
                    fields[index] = Some(value);
                }
            }
            reader.skip_ws();
            match reader.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
    }
    reader.skip_ws();
    if reader.at != reader.bytes.len() {
        return None;
    }
    Some(fields)
}

struct Reader<'a> {
    bytes: &'a [u8],
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        match self.peek()? {
            b'"' => {
                self.at += 1;
                Some(Value::Str(self.string_body()?))
            }
            b'-' | b'0'..=b'9' => self.number(),
            b'n' => self.literal(b"null", Value::Null),
            b't' => self.literal(b"true", Value::Bool),
            b'f' => self.literal(b"false", Value::Bool),
            b'[' | b'{' => {
                self.skip_nested(depth + 1)?;
                Some(Value::Nested)
            }
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8], value: Value<'a>) -> Option<Value<'a>> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Some(value)
        } else {
            None
        }
    }

    /// An array or object, checked against the grammar and skipped.
    fn skip_nested(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let close = if self.next()? == b'[' { b']' } else { b'}' };
        self.skip_ws();
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            self.skip_ws();
            if close == b'}' {
                self.expect(b'"')?;
                self.string_body()?;
                self.skip_ws();
                self.expect(b':')?;
                self.skip_ws();
            }
            self.value(depth)?;
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                byte if byte == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// A number by the JSON grammar: an integer without fraction or exponent, else a float.
    fn number(&mut self) -> Option<Value<'a>> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
            float = true;
        }
        let text = &self.text[start..self.at];
        if float {
            // correctly rounded, as orjson reads it; a number that rounds to infinity orjson
            // refuses (the whole line is malformed), so it is not ours to read
            text.parse::<f64>().ok().filter(|number| number.is_finite()).map(Value::Float)
        } else {
            text.parse::<i64>().ok().map(Value::Int) // beyond 64 bits: None
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    /// The rest of a string after its opening quote, unescaped.
    fn string_body(&mut self) -> Option<Cow<'a, str>> {
        let start = self.at;
        loop {
            match self.next()? {
                b'"' => return Some(Cow::Borrowed(&self.text[start..self.at - 1])),
                b'\\' => break,
                0..=0x1f => return None, // control characters must be escaped
                _ => {}
            }
        }
        let mut out = String::from(&self.text[start..self.at - 1]);
        self.at -= 1;
        loop {
            let run = self.at;
            loop {
                match self.peek()? {
                    b'"' | b'\\' => break,
                    0..=0x1f => return None,
                    _ => self.at += 1,
                }
            }
            out.push_str(&self.text[run..self.at]);
            if self.next()? == b'"' {
                return Some(Cow::Owned(out));
            }
            let escaped = match self.next()? {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.unicode_escape()?,
                _ => return None,
            };
            out.push(escaped);
        }
    }

    /// The character of a `\uXXXX` escape (a surrogate pair takes two); a lone surrogate: None.
    fn unicode_escape(&mut self) -> Option<char> {
        let first = self.hex4()?;
        if (0xDC00..0xE000).contains(&first) {
            return None;
        }
        if (0xD800..0xDC00).contains(&first) {
            if !self.bytes[self.at..].starts_with(b"\\u") {
                return None;
            }
            self.at += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return None;
            }
            return char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00));
        }
        char::from_u32(first)
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.at..self.at + 4)?;
        let mut code = 0;
        for &byte in digits {
            code = code * 16 + (byte as char).to_digit(16)?;
        }
        self.at += 4;
        Some(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<'a>(fields: &'a Fields, name: &str) -> &'a Option<Value<'a>> {
        &fields[field_index(name).unwrap()]
    }

    #[test]
    fn reads_known_fields_and_skips_others() {
        let raw = br#" {"type":"purchase","ts":17,"amount":1.5,"x":[1,{"a":"b"}],"member_id":null,
                       "comment":"a\"b\u00e9\ud83d\ude00"} "#;
        let fields = read_object(raw).unwrap();
        assert_eq!(field(&fields, "type"), &Some(Value::Str("purchase".into())));
        assert_eq!(field(&fields, "ts"), &Some(Value::Int(17)));
        assert_eq!(field(&fields, "amount"), &Some(Value::Float(1.5)));
        assert_eq!(field(&fields, "member_id"), &None);
        assert_eq!(field(&fields, "comment"), &Some(Value::Str("a\"b\u{e9}\u{1F600}".into())));
    }

    #[test]
    fn refuses_what_it_is_not_sure_of() {
        for raw in [
            &b"[1]"[..], b"{", b"{\"a\":1,}", b"{\"a\":01}", b"{\"a\":1} x", b"{\"ts\":1,\"ts\":2}",
            b"{\"a\":\"\\ud800\"}", b"{\"a\":99999999999999999999}", b"{\"a\":NaN}",
            b"{\"a\":\"\x01\"}", b"{\"a\":1.}", b"{\"a\":-}", b"\xff", b"{\"a\":[1,]}",
            b"{\"a\":1e400}", b"{\"a\":[-1.8e308]}",
        ] {
            assert!(read_object(raw).is_none(), "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
