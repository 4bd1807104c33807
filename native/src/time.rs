//! Timestamps as the Python core reads them (`stream_kpis.core.timebase`), for the forms this
//! side is sure of; anything else is `None` and left to the Python reader.

/// Days since 1970-01-01 of a proleptic Gregorian date, or None when there is no such date
/// (years 1 to 9999, as Python's `datetime.date`).
pub fn epoch_day(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(1..=9999).contains(&year) || !(1..=12).contains(&month) || day < 1 {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if day > days_in_month[(month - 1) as usize] {
        return None;
    }
    // days from civil (H. Hinnant's algorithm), March-based years
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

/// The value of `count` ASCII digits at `at`, or None.
pub fn digits(bytes: &[u8], at: usize, count: usize) -> Option<i64> {
    let slice = bytes.get(at..at + count)?;
    let mut value = 0i64;
    for &byte in slice {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(byte - b'0');
    }
    Some(value)
}

/// Epoch ms of a day and a time of day, when the time of day is valid.
pub fn at_time(day: i64, hour: i64, minute: i64, second: i64) -> Option<i64> {
    if hour >= 24 || minute >= 60 || second >= 60 {
        return None;
    }
    Some(((day * 24 + hour) * 60 + minute) * 60_000 + second * 1000)
}

/// `parse_rfc3339_ms`: `YYYY-MM-DD[Tt ]HH:MM:SS[.f]` with `Z`/`z` or `+HH:MM`/`-HH:MM`, to
/// epoch ms (floored); fraction digits beyond microseconds are dropped, as Python does.
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':' || b[16] != b':'
    {
        return None;
    }
    let day = epoch_day(digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?)?;
    let local = at_time(day, digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?)?;
    let mut at = 19;
    let mut micros = 0i64;
    if b[at] == b'.' {
        let start = at + 1;
        at = start;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        // Python reads microseconds: digits beyond the sixth are dropped, not rounded
        let count = (at - start).min(6);
        if count == 0 {
            return None;
        }
        micros = digits(b, start, count)? * 10i64.pow((6 - count) as u32);
    }
    let offset_ms = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (digits(b, at + 1, 2)?, digits(b, at + 4, 2)?);
            if hours >= 24 || minutes >= 60 {
                return None;
            }
            let offset = (hours * 60 + minutes) * 60_000;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    Some(local - offset_ms + micros.div_euclid(1000))
}

/// A parser of one `strptime` pattern made of `%Y %m %d %H %M %S` (each once; Y, m and d
/// present) and literal ASCII text, for the zero-padded form; None for any other pattern.
pub struct FixedWidth {
    /// (offset in the text, width, which of Y m d H M S) per directive
    parts: Vec<(usize, usize, usize)>,
    literals: Vec<(usize, u8)>,
    width: usize,
}

impl FixedWidth {
    pub fn new(pattern: &str) -> Option<FixedWidth> {
        let b = pattern.as_bytes();
        let (mut parts, mut literals, mut seen) = (Vec::new(), Vec::new(), [false; 6]);
        let (mut i, mut width) = (0, 0);
        while i < b.len() {
            if b[i] == b'%' {
                let which = b"YmdHMS".iter().position(|&c| Some(&c) == b.get(i + 1))?;
                if seen[which] {
                    return None;
                }
                seen[which] = true;
                let size = if which == 0 { 4 } else { 2 };
                parts.push((width, size, which));
                width += size;
                i += 2;
            } else {
                // literal ASCII text; the text must have exactly it there (strptime would also
                // take other white space for a space: then Python decides)
                if !b[i].is_ascii() {
                    return None;
                }
                literals.push((width, b[i]));
                width += 1;
                i += 1;
            }
        }
        (seen[0] && seen[1] && seen[2]).then_some(FixedWidth { parts, literals, width })
    }

    /// Epoch ms of `text` in the zero-padded form, or None (then Python's strptime decides).
    pub fn parse(&self, text: &str) -> Option<i64> {
        let b = text.as_bytes();
        if b.len() != self.width || self.literals.iter().any(|&(at, byte)| b[at] != byte) {
            return None;
        }
        let mut values = [0i64; 6];
        for &(at, size, which) in &self.parts {
            values[which] = digits(b, at, size)?;
        }
        let day = epoch_day(values[0], values[1], values[2])?;
        at_time(day, values[3], values[4], values[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_days() {
        assert_eq!(epoch_day(1970, 1, 1), Some(0));
        assert_eq!(epoch_day(2000, 3, 1), Some(11_017));
        assert_eq!(epoch_day(2024, 2, 29), Some(19_782));
        assert_eq!(epoch_day(2023, 2, 29), None);
        assert_eq!(epoch_day(1, 1, 1), Some(-719_162));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(rfc3339_ms("1970-01-01T02:00:00+02:00"), Some(0));
        assert_eq!(rfc3339_ms("1969-12-31T23:59:59.9999Z"), Some(-1));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00.123456789Z"), Some(123));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:60Z"), None);
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00"), None);
    }

    #[test]
    fn fixed_width() {
        let spaced = FixedWidth::new("%d/%m/%Y %H:%M").unwrap();
        assert_eq!(spaced.parse("02/01/1970 00:01"), Some(86_460_000));
        assert_eq!(spaced.parse("02/01/1970  0:01"), None);
        let fixed = FixedWidth::new("%Y-%m-%dT%H:%M").unwrap();
        assert_eq!(fixed.parse("1970-01-02T00:01"), Some(86_460_000));
        assert_eq!(fixed.parse("1970-01-02T24:01"), None);
        assert!(FixedWidth::new("%Y-%m").is_none());
    }
}
