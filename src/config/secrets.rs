//! [`Secret`], the type of every secret setting (it prints as `[redacted]`), and secrets as the
//! exact strings given, from the TOML file, the environment or a `<key>_file`.
//!
//! figment reads environment values as TOML-like literals: `0123` would become the number 123,
//! `true` a boolean, `[x]` an array. Secret keys (and their `_file` forms) are therefore kept out of
//! figment's `Env` provider and merged as raw strings instead. A `<key>_file` names a file whose
//! content is the secret (Kubernetes Secret volumes, systemd `LoadCredential=`); it is read after
//! extraction, and again on every reload.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::Serialized;
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Config, ConfigError, ENV_PREFIX};

/// What a secret prints as, wherever the configuration is logged or shown.
pub(super) const REDACTED: &str = "[redacted]";

/// A secret string: deserialized from config, compared by the code that owns it, printed as `[redacted]`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps `value`; from here on it prints as `[redacted]`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }
    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Secret keys settable from the environment, as the variable's suffix and the dotted key, with
/// their `_file` forms. Their values are taken as they are, never parsed.
const RAW_ENV_KEYS: &[(&str, &str)] = &[
    ("HUGGY__TOKENS", "huggy.tokens"),
    ("HUGGY__TOKENS_FILE", "huggy.tokens_file"),
    ("KAFKA__SASL__PASSWORD", "kafka.sasl.password"),
    ("KAFKA__SASL__PASSWORD_FILE", "kafka.sasl.password_file"),
    ("KAFKA__TLS__KEY_PASSWORD", "kafka.tls.key_password"),
    ("KAFKA__TLS__KEY_PASSWORD_FILE", "kafka.tls.key_password_file"),
    ("FILES__S3__ACCESS_KEY_ID", "files.s3.access_key_id"),
    ("FILES__S3__ACCESS_KEY_ID_FILE", "files.s3.access_key_id_file"),
    ("FILES__S3__SECRET_ACCESS_KEY", "files.s3.secret_access_key"),
    ("FILES__S3__SECRET_ACCESS_KEY_FILE", "files.s3.secret_access_key_file"),
];

/// Whether an environment key (prefix stripped, any letter case) is a secret key taken raw.
pub(super) fn is_raw_env_key(key: &str) -> bool {
    RAW_ENV_KEYS.iter().any(|(var, _)| var.eq_ignore_ascii_case(key))
}

/// Merges the secret keys set in the environment onto `figment` as strings, exactly as given.
pub(super) fn merge_raw_env(mut figment: Figment) -> Figment {
    for (name, value) in std::env::vars_os() {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else { continue };
        let Some(rest) = name.get(..ENV_PREFIX.len()).filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX)) else {
            continue;
        };
        let suffix = &name[rest.len()..];
        if let Some((_, key)) = RAW_ENV_KEYS.iter().find(|(var, _)| var.eq_ignore_ascii_case(suffix)) {
            figment = figment.merge(Serialized::default(key, value.to_owned()));
        }
    }
    figment
}

/// Reads a secret file: its content, less one trailing line break (what `echo` and editors add).
fn read_secret_file(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    Ok(text.to_owned())
}

/// Reads a tokens file: one token per line, surrounding blanks trimmed, empty lines skipped.
fn read_tokens_file(path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: "huggy.tokens_file",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.lines().map(str::trim).filter(|t| !t.is_empty()).map(Secret::new).collect())
}

/// Fills `value` from `file` when it is set; both set is an error (which one would win?).
fn resolve_one(
    key: &'static str,
    file_key: &'static str,
    value: &mut Option<Secret>,
    file: Option<&PathBuf>,
) -> Result<(), ConfigError> {
    let Some(path) = file else { return Ok(()) };
    if value.is_some() {
        return Err(ConfigError::SecretTwice { key, file_key });
    }
    *value = Some(Secret::new(read_secret_file(file_key, path)?));
    Ok(())
}

impl Config {
    /// Reads every `<key>_file` into its key.
    ///
    /// # Errors
    /// A file cannot be read, or a secret is set both directly and as a file.
    pub(super) fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.huggy.tokens_file {
            if !self.huggy.tokens.is_empty() {
                return Err(ConfigError::SecretTwice { key: "huggy.tokens", file_key: "huggy.tokens_file" });
            }
            self.huggy.tokens = read_tokens_file(path)?;
        }
        for (index, account) in self.huggy.accounts.iter_mut().enumerate() {
            let Some(path) = &account.tokens_file else { continue };
            if !account.tokens.is_empty() {
                return Err(ConfigError::Account { index, problem: "tokens and tokens_file are both set" });
            }
            account.tokens = read_tokens_file(path).map_err(|e| match e {
                ConfigError::SecretFile { path, source, .. } => {
                    ConfigError::TokensFile { key: format!("huggy.accounts[{index}].tokens_file"), path, source }
                }
                other => other,
            })?;
        }
        let sasl = &mut self.kafka.sasl;
        resolve_one(
            "kafka.sasl.password",
            "kafka.sasl.password_file",
            &mut sasl.password,
            sasl.password_file.as_ref(),
        )?;
        let tls = &mut self.kafka.tls;
        resolve_one(
            "kafka.tls.key_password",
            "kafka.tls.key_password_file",
            &mut tls.key_password,
            tls.key_password_file.as_ref(),
        )?;
        let s3 = &mut self.files.s3;
        resolve_one(
            "files.s3.access_key_id",
            "files.s3.access_key_id_file",
            &mut s3.access_key_id,
            s3.access_key_id_file.as_ref(),
        )?;
        resolve_one(
            "files.s3.secret_access_key",
            "files.s3.secret_access_key_file",
            &mut s3.secret_access_key,
            s3.secret_access_key_file.as_ref(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use figment::Jail;

    use super::*;

    /// Values figment's environment parsing would turn into something else.
    const TRICKY: &[&str] = &["0123", "true", "false", "1e3", "-7", "[x]", "{a=1}", "12345678901234567890123", "\"q\""];

    fn exposed(s: &Option<Secret>) -> Option<&str> {
        s.as_ref().map(Secret::expose)
    }

    /// Every single-valued secret key, how to read it back, and the minimal settings that make it valid.
    type Reader = fn(&Config) -> Option<&str>;
    type EnvVars = &'static [(&'static str, &'static str)];
    const SASL: &[(&str, &str)] =
        &[("HUGGY_BRIDGE_KAFKA__SASL__MECHANISM", "PLAIN"), ("HUGGY_BRIDGE_KAFKA__SASL__USERNAME", "u")];

    fn single_secrets() -> Vec<(&'static str, Reader, EnvVars)> {
        vec![
            ("kafka.sasl.password", |c| exposed(&c.kafka.sasl.password), SASL),
            ("kafka.tls.key_password", |c| exposed(&c.kafka.tls.key_password), &[]),
            ("files.s3.access_key_id", |c| exposed(&c.files.s3.access_key_id), &[]),
            ("files.s3.secret_access_key", |c| exposed(&c.files.s3.secret_access_key), &[]),
        ]
    }

    fn set_all(jail: &mut Jail, vars: &[(&str, &str)]) {
        for (k, v) in vars {
            jail.set_env(k, v);
        }
    }

    fn env_name(key: &str) -> String {
        format!("{ENV_PREFIX}{}", key.replace('.', "__").to_ascii_uppercase())
    }

    /// A TOML file setting `key` (dotted) to the string `value`.
    fn toml_setting(key: &str, value: &str) -> String {
        let (section, field) = key.rsplit_once('.').expect("dotted");
        format!("[huggy]\ntokens_file = \"tokens\"\n[{section}]\n{field} = {}\n", toml_string(value))
    }

    fn toml_string(value: &str) -> String {
        toml::Value::String(value.to_owned()).to_string()
    }

    #[test]
    fn tokens_from_the_environment_are_exact_strings() {
        for v in TRICKY {
            Jail::expect_with(|jail| {
                jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", v);
                let cfg = Config::load(None).unwrap_or_else(|e| panic!("{v}: {e}"));
                let tokens: Vec<&str> = cfg.huggy.tokens.iter().map(Secret::expose).collect();
                assert_eq!(tokens, [*v], "{v}");
                Ok(())
            });
        }
    }

    #[test]
    fn tokens_from_the_environment_split_at_commas_and_a_lowercase_name_counts() {
        Jail::expect_with(|jail| {
            jail.set_env("huggy_bridge_huggy__tokens", "0123, true ,,007");
            let cfg = Config::load(None).expect("loads");
            let tokens: Vec<&str> = cfg.huggy.tokens.iter().map(Secret::expose).collect();
            assert_eq!(tokens, ["0123", "true", "007"]);
            Ok(())
        });
    }

    #[test]
    fn tokens_from_toml_and_from_a_file_are_exact_strings() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[huggy]\ntokens = [\"0123\", \"true\", 42]\n")?;
            let cfg = Config::load(Some(Path::new("c.toml"))).expect("loads");
            let tokens: Vec<&str> = cfg.huggy.tokens.iter().map(Secret::expose).collect();
            assert_eq!(tokens, ["0123", "true", "42"]);

            jail.create_file("tokens", "0123\r\n\n  true  \nfalse\n# not a comment\n")?;
            jail.create_file("f.toml", "[huggy]\ntokens_file = \"tokens\"\n")?;
            let cfg = Config::load(Some(Path::new("f.toml"))).expect("loads");
            let tokens: Vec<&str> = cfg.huggy.tokens.iter().map(Secret::expose).collect();
            assert_eq!(tokens, ["0123", "true", "false", "# not a comment"]);
            assert!(!cfg.to_redacted_toml().contains("0123"));
            Ok(())
        });
    }

    #[test]
    fn a_tokens_file_from_the_environment_even_with_a_numeric_name() {
        Jail::expect_with(|jail| {
            jail.create_file("0123", "true\n")?;
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS_FILE", "0123");
            let cfg = Config::load(None).expect("loads");
            assert_eq!(cfg.huggy.tokens.iter().map(Secret::expose).collect::<Vec<_>>(), ["true"]);
            Ok(())
        });
    }

    #[test]
    fn an_empty_tokens_file_leaves_no_token_and_is_refused() {
        Jail::expect_with(|jail| {
            jail.create_file("tokens", "\n  \n")?;
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS_FILE", "tokens");
            assert!(matches!(Config::load(None), Err(ConfigError::NoTokens)));
            Ok(())
        });
    }

    #[test]
    fn every_single_secret_from_the_environment_is_exact() {
        for (key, read, extra) in single_secrets() {
            for v in TRICKY {
                Jail::expect_with(|jail| {
                    set_all(jail, extra);
                    jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
                    jail.set_env(env_name(key), v);
                    let cfg = Config::load_offline(None).unwrap_or_else(|e| panic!("{key}={v}: {e}"));
                    assert_eq!(read(&cfg), Some(*v), "{key}");
                    Ok(())
                });
            }
        }
    }

    #[test]
    fn every_single_secret_from_toml_is_exact() {
        for (key, read, extra) in single_secrets() {
            for v in TRICKY {
                Jail::expect_with(|jail| {
                    set_all(jail, extra);
                    jail.create_file("tokens", "t\n")?;
                    jail.create_file("c.toml", &toml_setting(key, v))?;
                    let cfg = Config::load_offline(Some(Path::new("c.toml"))).unwrap_or_else(|e| panic!("{key}: {e}"));
                    assert_eq!(read(&cfg), Some(*v), "{key}");
                    Ok(())
                });
            }
        }
    }

    #[test]
    fn every_single_secret_from_a_file_is_exact_with_one_line_break_dropped() {
        for (key, read, extra) in single_secrets() {
            for v in TRICKY {
                for (content, expected) in [
                    (format!("{v}\n"), v.to_string()),
                    (format!("{v}\r\n"), v.to_string()),
                    (v.to_string(), v.to_string()),
                    (format!(" {v} \n\n"), format!(" {v} \n")),
                ] {
                    Jail::expect_with(|jail| {
                        set_all(jail, extra);
                        jail.create_file("secret", &content)?;
                        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
                        jail.set_env(format!("{}_FILE", env_name(key)), "secret");
                        let cfg = Config::load_offline(None).unwrap_or_else(|e| panic!("{key}: {e}"));
                        assert_eq!(read(&cfg), Some(expected.as_str()), "{key} from {content:?}");
                        Ok(())
                    });
                }
            }
            Jail::expect_with(|jail| {
                set_all(jail, extra);
                jail.create_file("secret", "x")?;
                jail.create_file(
                    "c.toml",
                    &format!("{}{}_file = \"secret\"\n", toml_setting(key, "y"), key_field(key)),
                )?;
                jail.create_file("tokens", "t\n")?;
                let e = Config::load_offline(Some(Path::new("c.toml"))).unwrap_err().to_string();
                assert!(e.contains(&format!("{key} and {key}_file")), "{e}");
                Ok(())
            });
        }
    }

    fn key_field(key: &str) -> &str {
        key.rsplit_once('.').expect("dotted").1
    }

    #[test]
    fn a_missing_secret_file_names_the_key_and_the_path() {
        Jail::expect_with(|jail| {
            jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS_FILE", "/nonexistent/tokens");
            let e = Config::load(None).unwrap_err();
            let text = format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
            assert!(text.contains("huggy.tokens_file") && text.contains("/nonexistent/tokens"), "{text}");
            Ok(())
        });
    }
}
