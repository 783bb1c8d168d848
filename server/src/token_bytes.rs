//! Each token's own bytes, for the `bytes` of chat log-probabilities: a token that holds part of a
//! UTF-8 character decodes to U+FFFD, whose bytes would be wrong.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

/// Bytes of the tokens whose text alone does not give them: byte-level BPE tokens (their characters
/// map back through the byte-level alphabet) and byte-fallback tokens (`<0xNN>`). Other tokens, and
/// every token of a tokenizer this cannot read, use their decoded text.
pub fn table(tokenizer_json: &Path) -> HashMap<u32, Vec<u8>> {
    let Some(v) = std::fs::read(tokenizer_json)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return HashMap::new();
    };
    let byte_level = mentions_byte_level(&v["decoder"]);
    let alphabet = byte_alphabet();
    let mut out = HashMap::new();
    let Some(vocab) = v["model"]["vocab"].as_object() else {
        return out;
    };
    for (token, id) in vocab {
        let Some(id) = id.as_u64().and_then(|i| u32::try_from(i).ok()) else {
            continue;
        };
        let bytes = match byte_fallback(token) {
            Some(b) => Some(vec![b]),
            None if byte_level => token.chars().map(|c| alphabet.get(&c).copied()).collect(),
            None => None,
        };
        if let Some(b) = bytes {
            out.insert(id, b);
        }
    }
    // Special tokens are decoded to nothing, not to their spelling.
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = t["id"].as_u64().and_then(|i| u32::try_from(i).ok()) {
            out.remove(&id);
        }
    }
    out
}

fn mentions_byte_level(decoder: &Value) -> bool {
    decoder["type"] == "ByteLevel"
        || decoder["decoders"]
            .as_array()
            .is_some_and(|d| d.iter().any(mentions_byte_level))
}

/// `<0xE2>` -> 0xE2.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The byte-level alphabet: printable bytes stand for themselves, the other bytes for the characters
/// from U+0100 on, in byte order.
fn byte_alphabet() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_and_fallback() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!(a[&'Ġ'], b' ');
        assert_eq!(a[&'â'], 0xE2);
        assert_eq!(byte_fallback("<0xE2>"), Some(0xE2));
        assert_eq!(byte_fallback("<0xE>"), None);
        assert_eq!(byte_fallback("hello"), None);
    }

    #[test]
    fn byte_level_tokenizer_gives_raw_bytes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/tiny-flexolmo/tokenizer.json");
        let t = table(&path);
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // `â` alone is the first byte of a three-byte character.
        let id = v["model"]["vocab"]["â"].as_u64().unwrap() as u32;
        assert_eq!(t[&id], vec![0xE2]);
    }
}
