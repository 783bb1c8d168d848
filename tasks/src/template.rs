//! Jinja rendering of documents (minijinja, undefined variables are errors, like the harness's
//! `StrictUndefined`) and the small part of Python's `ast.literal_eval` that task files rely on.

use minijinja::value::{from_args, ValueKind};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior};
use serde_json::Value;

use crate::dataset::Doc;

/// The shared template environment as lm-evaluation-harness 0.4 configures Jinja2: strict undefined,
/// trailing newlines kept, Python's str/list/dict methods ([`python_methods`]). Its `regex_replace`
/// filter is not provided (no bundled task file uses it); a template calling it fails to render.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_unknown_method_callback(python_methods);
    env
}

/// Python methods on template values: minijinja-contrib's `pycompat` set, plus `index` on strings and
/// lists, which task files use to turn an answer key into a choice index (`choices.label.index(answerKey)`)
/// and which pycompat lacks. Like Python, `index` of a missing value is an error, not -1.
pub fn python_methods(
    state: &State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, minijinja::Error> {
    if method == "index" {
        let (what,): (&minijinja::Value,) = from_args(args)?;
        let found = match value.kind() {
            ValueKind::String => match (value.as_str(), what.as_str()) {
                (Some(s), Some(w)) => s.find(w).map(|b| s[..b].chars().count()),
                _ => None,
            },
            ValueKind::Seq => value.try_iter()?.position(|x| &x == what),
            _ => {
                return minijinja_contrib::pycompat::unknown_method_callback(
                    state, value, method, args,
                )
            }
        };
        return found.map(minijinja::Value::from).ok_or_else(|| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{what} is not in {value} (Python's `.index` raises ValueError)"),
            )
        });
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Renders `template` with the document's fields as variables.
pub(crate) fn render(env: &Environment<'_>, template: &str, doc: &Doc) -> Result<String, String> {
    env.render_str(template, doc).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })
}

/// Python's `str.isdigit`, for ASCII digits (other digits would not parse as an index anyway).
pub(crate) fn is_py_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// Parses a Python literal: strings (single or double quotes, with escapes), integers, floats,
/// True/False/None, and lists/tuples of these (dicts become their values' list is not needed).
pub(crate) fn literal_eval(s: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        src: s,
        i: 0,
    };
    p.ws();
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text after a Python literal in {s:?}"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!(
            "not a Python literal ({what} at byte {}): {:?}",
            self.i, self.src
        ))
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.s.get(self.i) {
            Some(b'[') | Some(b'(') => {
                let close = if self.s[self.i] == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&close) {
                        self.i += 1;
                        return Ok(Value::Array(items));
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(c) if *c == close => {}
                        _ => return self.err("expected , or a closing bracket"),
                    }
                }
            }
            Some(b'\'') | Some(b'"') => self.string().map(Value::String),
            Some(c) if c.is_ascii_digit() || *c == b'-' || *c == b'+' || *c == b'.' => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric()
                        || matches!(self.s[self.i], b'.' | b'_' | b'-' | b'+'))
                {
                    self.i += 1;
                }
                let t = self.src[start..self.i].replace('_', "");
                if let Ok(n) = t.parse::<i64>() {
                    return Ok(Value::from(n));
                }
                match t.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                    Some(n) => Ok(Value::Number(n)),
                    None => self.err("bad number"),
                }
            }
            _ => {
                for (word, v) in [
                    ("True", Value::Bool(true)),
                    ("False", Value::Bool(false)),
                    ("None", Value::Null),
                    // minijinja spells these the JSON way when it renders a value.
                    ("true", Value::Bool(true)),
                    ("false", Value::Bool(false)),
                    ("none", Value::Null),
                ] {
                    if self.src[self.i..].starts_with(word) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                self.err("unexpected character")
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        let rest = &self.src[self.i..];
        let mut chars = rest.char_indices();
        while let Some((k, c)) = chars.next() {
            if c as u32 == q as u32 {
                self.i += k + 1;
                return Ok(out);
            }
            if c == '\\' {
                let Some((_, e)) = chars.next() else { break };
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '0' => out.push('\0'),
                    '\\' | '\'' | '"' => out.push(e),
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String =
                            (0..n).filter_map(|_| chars.next().map(|x| x.1)).collect();
                        match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                            Some(ch) => out.push(ch),
                            None => return self.err("bad escape"),
                        }
                    }
                    '\n' => {}
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
                continue;
            }
            out.push(c);
        }
        self.err("unterminated string")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_eval_lists() {
        assert_eq!(
            literal_eval(r#"['a', "b's", 3, -1.5, True, None]"#).unwrap(),
            serde_json::json!(["a", "b's", 3, -1.5, true, null])
        );
        assert_eq!(literal_eval("7").unwrap(), serde_json::json!(7));
        assert!(literal_eval("[1, 2").is_err());
        assert_eq!(literal_eval("'\\n'").unwrap(), serde_json::json!("\n"));
    }

    #[test]
    fn python_methods_as_jinja2() {
        let env = environment();
        let doc: Doc = serde_json::from_str(
            r#"{"choices": {"label": ["A", "B", "C"]}, "answerKey": " B", "q": "  Why?  ", "n": 0, "xs": []}"#,
        )
        .unwrap();
        let r = |t: &str| render(&env, t, &doc);
        assert_eq!(
            r("{{choices.label.index(answerKey.lstrip())}}").unwrap(),
            "1"
        );
        assert_eq!(r("{{['A', 'B', 'C', 'D'].index('D')}}").unwrap(), "3");
        assert_eq!(r("{{'héllo'.index('l')}}").unwrap(), "2");
        assert_eq!(
            r("{{q.strip()}}|{{q.split()|join(',')}}|{{q.replace('?', '!')}}").unwrap(),
            "Why?|Why?|  Why!  "
        );
        assert_eq!(
            r("{{q.strip().upper()}} {{'a b'.startswith('a')}}").unwrap(),
            "WHY? True"
        );
        assert_eq!(
            r("{{choices|tojson}}").unwrap(),
            r#"{"label":["A","B","C"]}"#
        );
        // Python truthiness: 0 and [] are false; slicing as in Python.
        assert_eq!(r("{{'y' if n else 'n'}}{{'y' if xs else 'n'}}{{choices.label[1:]|join}}{{q.strip()[::-1]}}").unwrap(), "nnBC?yhW");
        assert_eq!(r("{{true}} {{n == 0}}").unwrap(), "True True");
        let e = r("{{choices.label.index('Z')}}").unwrap_err();
        assert!(e.contains("not in"), "{e}");
        let e = r("{{q.no_such_method()}}").unwrap_err();
        assert!(
            e.contains("no_such_method") || e.contains("unknown method"),
            "{e}"
        );
    }

    #[test]
    fn strict_undefined() {
        let env = environment();
        let doc: Doc = serde_json::from_str(r#"{"q": "hi"}"#).unwrap();
        assert_eq!(render(&env, "Q: {{q}}\n", &doc).unwrap(), "Q: hi\n");
        assert!(render(&env, "{{missing}}", &doc).is_err());
    }
}
