//! Owners' bearer tokens for the admin API, stored as SHA-256 digests in a TOML file:
//!
//! ```toml
//! [[owner]]
//! name = "Math Owner"    # the `owner` of its experts in experts.toml
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//! A digest is `printf %s "$TOKEN" | sha256sum`. The file never holds a token itself.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerEntry {
    name: String,
    token_sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    owner: Vec<OwnerEntry>,
}

/// Owners and the digests of their tokens.
pub struct AdminTokens {
    owners: Vec<(String, [u8; 32])>,
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl AdminTokens {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the admin tokens file {}", path.display()))?;
        let file: TokensFile = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid admin tokens file", path.display()))?;
        let mut owners = Vec::new();
        for o in file.owner {
            let digest = parse_hex32(&o.token_sha256).with_context(|| {
                format!(
                    "{}: owner `{}`: token_sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)",
                    path.display(),
                    o.name
                )
            })?;
            // A token shared by two owners would let either change the other's experts, and the
            // audit log could not say which of them acted.
            if let Some((other, _)) = owners.iter().find(|(_, d)| *d == digest) {
                anyhow::bail!(
                    "{}: owners `{other}` and `{}` have the same token; give each owner its own",
                    path.display(),
                    o.name
                );
            }
            owners.push((o.name, digest));
        }
        anyhow::ensure!(
            !owners.is_empty(),
            "{} names no owners ([[owner]] name = ..., token_sha256 = ...)",
            path.display()
        );
        Ok(Self { owners })
    }

    /// The owner a bearer token belongs to.
    pub fn owner_of(&self, token: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare every digest in full, so timing does not tell how much of one matched.
        let mut found = None;
        for (name, d) in &self.owners {
            let diff = d.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Hex SHA-256 of a token, as the tokens file stores it.
#[cfg(test)]
pub fn digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        assert_eq!(
            digest_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        std::fs::write(
            &path,
            format!(
                "[[owner]]\nname = \"A\"\ntoken_sha256 = \"{}\"\n[[owner]]\nname = \"B\"\ntoken_sha256 = \"{}\"\n",
                digest_hex("alpha"),
                digest_hex("beta")
            ),
        )
        .unwrap();
        let t = AdminTokens::load(&path).unwrap();
        assert_eq!(t.owner_of("alpha"), Some("A"));
        assert_eq!(t.owner_of("beta"), Some("B"));
        assert_eq!(t.owner_of("gamma"), None);
        std::fs::write(&path, "[[owner]]\nname = \"A\"\ntoken_sha256 = \"xyz\"\n").unwrap();
        assert!(AdminTokens::load(&path).is_err());
        std::fs::write(
            &path,
            format!(
                "[[owner]]\nname = \"A\"\ntoken_sha256 = \"{0}\"\n[[owner]]\nname = \"B\"\ntoken_sha256 = \"{0}\"\n",
                digest_hex("same")
            ),
        )
        .unwrap();
        let e = AdminTokens::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("same token") && e.contains("`A`") && e.contains("`B`"),
            "{e}"
        );
    }
}
