//! Python's `str` whitespace rules. The reference metric code splits and strips with Python's
//! `str.split()` / `str.strip()`, whose whitespace set is Unicode's `White_Space` plus the
//! information separators U+001C..U+001F; a byte-identical port needs exactly that set.

/// `str.isspace()` for one character.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s.split()`.
pub fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_space).filter(|w| !w.is_empty())
}

/// `s.strip()`.
pub fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// `s.rstrip()`.
pub fn rstrip(s: &str) -> &str {
    s.trim_end_matches(is_space)
}

/// `c in string.punctuation`.
pub fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}
