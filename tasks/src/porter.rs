//! The Porter stemmer as NLTK implements it by default (`PorterStemmer()`, mode
//! `NLTK_EXTENSIONS`), which is the stemmer `rouge_score` applies with `use_stemmer=True`. NLTK's
//! extensions (irregular forms, the `ies`/`ied` rules for four-letter words, `fulli`, `logi`,
//! the consonant-`y` rule of step 1c, ...) change stems, so the Snowball English stemmer
//! ("Porter2") does not give rouge_score's numbers. Words are ASCII lowercase here (rouge_score
//! tokens); other characters are treated as consonants, as NLTK does.

fn irregular(w: &str) -> Option<&'static str> {
    Some(match w {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

fn vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// NLTK's `_is_consonant`: `y` is a consonant after a vowel or at the start, alternating
/// through runs of `y`.
fn is_consonant(w: &[u8], mut i: usize) -> bool {
    if vowel(w[i]) {
        return false;
    }
    if w[i] == b'y' {
        let mut negate = false;
        while i > 0 && w[i] == b'y' {
            negate = !negate;
            i -= 1;
        }
        return vowel(w[i]) == negate;
    }
    true
}

fn consonant_flags(w: &[u8]) -> Vec<bool> {
    let mut f: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let v = if vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !f[i - 1]
        } else {
            true
        };
        f.push(v);
    }
    f
}

/// The number of vowel-consonant sequences.
fn measure(stem: &[u8]) -> usize {
    let f = consonant_flags(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[u8]) -> bool {
    !consonant_flags(stem).iter().all(|&c| c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

type Cond<'a> = &'a dyn Fn(&[u8]) -> bool;

/// The first rule whose suffix the word ends with decides: its replacement when the condition
/// holds on the stem, else the word unchanged. `*d` is NLTK's "ends in a double consonant".
fn apply(w: &[u8], rules: &[(&str, &str, Option<Cond>)]) -> Vec<u8> {
    for (suffix, repl, cond) in rules {
        if *suffix == "*d" && ends_double_consonant(w) {
            let stem = &w[..w.len() - 2];
            return if cond.is_none_or(|c| c(stem)) {
                [stem, repl.as_bytes()].concat()
            } else {
                w.to_vec()
            };
        }
        if w.ends_with(suffix.as_bytes()) {
            let stem = &w[..w.len() - suffix.len()];
            return if cond.is_none_or(|c| c(stem)) {
                [stem, repl.as_bytes()].concat()
            } else {
                w.to_vec()
            };
        }
    }
    w.to_vec()
}

fn replace(w: &[u8], suffix: &str, repl: &str) -> Vec<u8> {
    [&w[..w.len() - suffix.len()], repl.as_bytes()].concat()
}

fn step1a(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"ies") && w.len() == 4 {
        return replace(w, "ies", "ie");
    }
    apply(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"ied") {
        return replace(w, "ied", if w.len() == 4 { "ie" } else { "i" });
    }
    if w.ends_with(b"eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 {
            [stem, b"ee"].concat()
        } else {
            w.to_vec()
        };
    }
    let mut inter = None;
    for suffix in ["ed", "ing"] {
        if w.ends_with(suffix.as_bytes()) {
            let stem = &w[..w.len() - suffix.len()];
            if contains_vowel(stem) {
                inter = Some(stem);
                break;
            }
        }
    }
    let Some(inter) = inter else {
        return w.to_vec();
    };
    let last = inter.last().copied().unwrap_or(b' ');
    let last_s = (last as char).to_string();
    let not_lsz = |_: &[u8]| !matches!(last, b'l' | b's' | b'z');
    let add_e = |s: &[u8]| measure(s) == 1 && ends_cvc(s);
    apply(
        inter,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", last_s.as_str(), Some(&not_lsz)),
            ("", "e", Some(&add_e)),
        ],
    )
}

fn step1c(w: &[u8]) -> Vec<u8> {
    let cond = |s: &[u8]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply(w, &[("y", "i", Some(&cond))])
}

fn positive(s: &[u8]) -> bool {
    measure(s) > 0
}

fn step2(w: &[u8]) -> Vec<u8> {
    if w.ends_with(b"alli") && positive(&w[..w.len() - 4]) {
        return step2(&replace(w, "alli", "al"));
    }
    let logi = |_: &[u8]| positive(&w[..w.len() - 3]);
    let p: Cond = &positive;
    apply(
        w,
        &[
            ("ational", "ate", Some(p)),
            ("tional", "tion", Some(p)),
            ("enci", "ence", Some(p)),
            ("anci", "ance", Some(p)),
            ("izer", "ize", Some(p)),
            ("bli", "ble", Some(p)),
            ("alli", "al", Some(p)),
            ("entli", "ent", Some(p)),
            ("eli", "e", Some(p)),
            ("ousli", "ous", Some(p)),
            ("ization", "ize", Some(p)),
            ("ation", "ate", Some(p)),
            ("ator", "ate", Some(p)),
            ("alism", "al", Some(p)),
            ("iveness", "ive", Some(p)),
            ("fulness", "ful", Some(p)),
            ("ousness", "ous", Some(p)),
            ("aliti", "al", Some(p)),
            ("iviti", "ive", Some(p)),
            ("biliti", "ble", Some(p)),
            ("fulli", "ful", Some(p)),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: &[u8]) -> Vec<u8> {
    let p: Cond = &positive;
    apply(
        w,
        &[
            ("icate", "ic", Some(p)),
            ("ative", "", Some(p)),
            ("alize", "al", Some(p)),
            ("iciti", "ic", Some(p)),
            ("ical", "ic", Some(p)),
            ("ful", "", Some(p)),
            ("ness", "", Some(p)),
        ],
    )
}

fn step4(w: &[u8]) -> Vec<u8> {
    let gt1 = |s: &[u8]| measure(s) > 1;
    let ion = |s: &[u8]| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    let m: Cond = &gt1;
    let rules: Vec<(&str, &str, Option<Cond>)> = [
        "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
        "ou", "ism", "ate", "iti", "ous", "ive", "ize",
    ]
    .into_iter()
    .map(|s| (s, "", Some(if s == "ion" { &ion as Cond } else { m })))
    .collect();
    apply(w, &rules)
}

fn step5a(w: &[u8]) -> Vec<u8> {
    if let Some(stem) = w.strip_suffix(b"e") {
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w.to_vec()
}

fn step5b(w: &[u8]) -> Vec<u8> {
    let cond = |_: &[u8]| measure(&w[..w.len() - 1]) > 1;
    apply(w, &[("ll", "l", Some(&cond))])
}

/// NLTK's `PorterStemmer().stem(word)` for a lowercase ASCII word.
pub fn stem(word: &str) -> String {
    let w = word.to_lowercase();
    if let Some(s) = irregular(&w) {
        return s.to_string();
    }
    // NLTK tests the length of the word as given, in characters.
    if word.chars().count() <= 2 {
        return w;
    }
    let mut s = w.into_bytes();
    for step in [step1a, step1b, step1c, step2, step3, step4, step5a, step5b] {
        s = step(&s);
    }
    String::from_utf8_lossy(&s).into_owned()
}
