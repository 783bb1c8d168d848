//! Chat templates: the checkpoint's `chat_template` from `tokenizer_config.json` (a Jinja template, as
//! Hugging Face ships it), rendered with minijinja.

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
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
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
}
