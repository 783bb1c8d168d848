//! Chat templates: the checkpoint's `chat_template` from `tokenizer_config.json` (a Jinja template, as
//! Hugging Face ships it), rendered with minijinja in the environment transformers renders it in:
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python's str/list/dict methods, `tojson` as
//! Python's `json.dumps` (`ensure_ascii=False`, `indent`, `separators`, `sort_keys`),
//! `raise_exception` and `strftime_now`.

use std::path::Path;

use anyhow::{Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value;

/// A loaded chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

/// A special token in `tokenizer_config.json`: a string or `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads the template of a model directory, or from `override_file` when given. `Ok(None)` when the
    /// checkpoint has none (chat requests are then refused with a message saying so).
    pub fn load(model_dir: &Path, override_file: Option<&Path>) -> Result<Option<Self>> {
        let path = model_dir.join("tokenizer_config.json");
        let config: Value = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?
        } else {
            Value::Null
        };
        let source = match override_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read the chat template {}", f.display()))?,
            ),
            None => match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take the one named "default".
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(tasks::python_methods);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template_owned(NAME, source)
            .context("the chat template does not parse")?;
        Ok(Some(Self {
            env,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        }))
    }

    /// Renders `(role, content)` messages, ending with the prompt of the assistant's turn.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        let tmpl = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`, the
/// `tojson` transformers gives chat templates (minijinja's own is compact, HTML-escaped JSON).
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.clone(), key.clone())),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item_separator, key_separator)",
            ))
        }
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut v = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys.unwrap_or(false) {
        sort(&mut v);
    }
    // Python's defaults: ", " between items without indent, "," with it; ": " after keys.
    let (item, key) = separators.unwrap_or_else(|| {
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let mut out = Vec::new();
    let fmt = PyFormatter {
        item: item.into_bytes(),
        key: key.into_bytes(),
        indent: indent.map(|n| vec![b' '; n]),
        depth: 0,
        has_value: false,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&v, &mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn sort(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.sort_keys();
            o.values_mut().for_each(sort);
        }
        Value::Array(a) => a.iter_mut().for_each(sort),
        _ => {}
    }
}

/// `json.dumps`'s layout: configurable separators and, with `indent`, one item per line.
struct PyFormatter {
    item: Vec<u8>,
    key: Vec<u8>,
    indent: Option<Vec<u8>>,
    depth: usize,
    has_value: bool,
}

impl PyFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(ind) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(ind)?;
            }
        }
        Ok(())
    }
    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(c)
    }
    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(c)
    }
    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(&self.item)?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.key)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hugging_face_style_templates() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path(), None).unwrap().is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({
                "eos_token": {"content": "<|endoftext|>"},
                "chat_template": "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}{{ eos_token }}"
            })
            .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path(), None).unwrap().unwrap();
        let text = t.render(&[("user".into(), "hi".into())]).unwrap();
        assert_eq!(text, "<|user|>hi\n<|assistant|><|endoftext|>");
        let e = t.render(&[("tool".into(), "x".into())]).unwrap_err();
        assert!(e.contains("no tools"), "{e}");
    }

    /// Expected strings are what transformers 5.x's chat-template environment renders (Jinja2 with
    /// trim_blocks/lstrip_blocks and its `tojson`), i.e. Python's `json.dumps` with these arguments.
    #[test]
    fn python_methods_trimmed_blocks_and_tojson() {
        let dir = tempfile::tempdir().unwrap();
        let template = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip().upper() }}|{{ m.content.split()|length }}|{{ {'role': m.role, 'é': [1, 2.5, none]}|tojson }}|{{ {'b': 1, 'a': {}}|tojson(indent=2, sort_keys=true) }}]\n  {% endif %}\n{% endfor %}";
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": template}).to_string(),
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path(), None).unwrap().unwrap();
        let text = t.render(&[("user".into(), "  hi there ".into())]).unwrap();
        assert_eq!(
            text,
            "[HI THERE|2|{\"role\": \"user\", \"é\": [1, 2.5, null]}|{\n  \"a\": {},\n  \"b\": 1\n}]\n"
        );
    }
}
