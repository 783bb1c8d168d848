//! A word-level `tokenizer.json` over the generators' closed vocabulary.
//!
//! The file is a Hugging Face tokenizer (lowercasing normaliser, `Whitespace` then single-`Digits`
//! pre-tokenisers, `WordLevel` model), so the engine loads it like any other. [`words`] reproduces the
//! pre-tokenisation for ASCII text to collect the vocabulary; a test checks it against the real
//! tokenizer. Digits are single tokens so that numbers are spelled, not memorised as wholes.

use std::collections::BTreeSet;

use serde_json::{json, Value};

/// End of text: separates documents in training streams and prefixes empty contexts at evaluation.
pub const EOS: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";
pub const UNK: &str = "<unk>";

/// The pre-tokens of `text`: lowercased runs of letters, single digits, runs of other non-space
/// characters.
pub fn words(text: &str) -> Vec<String> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Punct,
        Space,
    }
    let class = |c: char| {
        if c.is_ascii_digit() {
            Class::Digit
        } else if c.is_alphanumeric() || c == '_' {
            Class::Letter
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Punct
        }
    };
    let mut out: Vec<String> = Vec::new();
    let mut prev = Class::Space;
    for c in text.to_lowercase().chars() {
        let k = class(c);
        let extend = k == prev && matches!(k, Class::Letter | Class::Punct);
        match (k, extend) {
            (Class::Space, _) => {}
            (_, true) => out.last_mut().expect("a run has begun").push(c),
            (_, false) => out.push(c.to_string()),
        }
        prev = k;
    }
    out
}

/// The `tokenizer.json` for every word of `texts`: special tokens first (`<|endoftext|>` = 0,
/// `<|pad|>` = 1, `<unk>` = 2), then the words in sorted order.
pub fn tokenizer_json<'a>(texts: impl IntoIterator<Item = &'a str>) -> Value {
    let mut vocab = BTreeSet::new();
    for t in texts {
        vocab.extend(words(t));
    }
    let mut map = serde_json::Map::new();
    for (i, w) in [EOS, PAD, UNK]
        .into_iter()
        .map(str::to_string)
        .chain(vocab)
        .enumerate()
    {
        map.insert(w, i.into());
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, EOS), special(1, PAD), special(2, UNK)],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Whitespace"},
            {"type": "Digits", "individual_digits": true}
        ]},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_the_pre_tokenizer() {
        assert_eq!(
            words("Print(total); What is 12 plus x2?\nThe"),
            ["print", "(", "total", ");", "what", "is", "1", "2", "plus", "x", "2", "?", "the"]
        );
    }
}
