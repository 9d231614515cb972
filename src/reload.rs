//! Reload: re-reads the configuration sources and applies what can change without a restart (SPEC
//! §3). SIGHUP (`systemctl reload`) triggers it; so can any other trigger holding a [`Reloader`].
//!
//! Applied live: the auth table (accepted tokens), swapped atomically, so a request is judged
//! whole by the table in force when it arrived; and whatever a part registered with
//! [`Reloader::on_reload`]. Other changes are reported as needing a restart. An invalid new
//! configuration is logged and the old one stays in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::http::{Auth, AuthTable};
use crate::metrics::{Metrics, ReloadResult};
use crate::telemetry::error_chain;

/// A part's error when it cannot take the new configuration.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

type Hook = Box<dyn Fn(&Config) -> Result<(), HookError> + Send + Sync>;

/// Why a reload was refused; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The sources could not be read, or the configuration they make is invalid.
    #[error("new configuration refused; the old one stays in force")]
    Invalid(#[source] ConfigError),
    /// A part (e.g. the TLS listener re-reading its certificate) could not take it.
    #[error("new configuration refused by {part}; the old one stays in force")]
    Part {
        /// The part's name as it registered.
        part: &'static str,
        /// Why.
        #[source]
        source: HookError,
    },
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Accepted tokens now in force.
    pub tokens: usize,
    /// Sections that changed but take effect only after a restart (`kafka`, `spool`, …).
    pub restart_needed: Vec<String>,
}

/// Applies new configurations to a running daemon; cheap to clone.
#[derive(Clone)]
pub struct Reloader(Arc<Inner>);

struct Inner {
    /// Held by a reload from before it reads the sources until it has applied them: a SIGHUP and
    /// the file watcher reloading at once apply in the order they read, so the newer read wins.
    reloading: Mutex<()>,
    /// The configuration in force.
    current: Mutex<Config>,
    auth: Arc<AuthTable>,
    metrics: Arc<Metrics>,
    hooks: Mutex<Vec<(&'static str, Hook)>>,
    /// Tests: runs after a reload read its sources, before it applies them.
    #[cfg(test)]
    between_read_and_apply: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Reloader {
    pub(crate) fn new(cfg: Config, auth: Arc<AuthTable>, metrics: Arc<Metrics>) -> Reloader {
        Reloader(Arc::new(Inner {
            reloading: Mutex::new(()),
            current: Mutex::new(cfg),
            auth,
            metrics,
            hooks: Mutex::new(Vec::new()),
            #[cfg(test)]
            between_read_and_apply: Mutex::new(None),
        }))
    }

    /// Registers a part that applies something of each new configuration (before the auth table is
    /// swapped). An error refuses the whole reload, so a hook should fail before it changes anything.
    pub fn on_reload(
        &self,
        part: &'static str,
        hook: impl Fn(&Config) -> Result<(), HookError> + Send + Sync + 'static,
    ) {
        self.0.hooks.lock().unwrap_or_else(PoisonError::into_inner).push((part, Box::new(hook)));
    }

    /// Re-reads the configuration sources (`path`, or `./config.toml`, then the environment, then
    /// every `<key>_file`) and applies them; logs and counts the result either way. Blocking (reads
    /// files).
    ///
    /// # Errors
    /// The new configuration is invalid, or a part refused it; the old one stays in force.
    pub fn reload(&self, path: Option<&Path>) -> Result<Applied, ReloadError> {
        let _one_at_a_time = self.0.reloading.lock().unwrap_or_else(PoisonError::into_inner);
        let result = Config::load(path).map_err(ReloadError::Invalid).and_then(|cfg| {
            #[cfg(test)]
            {
                let pause = self.0.between_read_and_apply.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if let Some(pause) = pause {
                    pause();
                }
            }
            self.apply_valid(cfg)
        });
        self.report(&result);
        result
    }

    /// Applies `cfg`, validated first; logs and counts the result.
    ///
    /// # Errors
    /// As [`Reloader::reload`].
    pub fn apply(&self, cfg: Config) -> Result<Applied, ReloadError> {
        let _one_at_a_time = self.0.reloading.lock().unwrap_or_else(PoisonError::into_inner);
        let result = cfg.validate().map_err(ReloadError::Invalid).and_then(|()| self.apply_valid(cfg));
        self.report(&result);
        result
    }

    /// Reloads from `path` whenever the content of a `<key>_file` in force (or of the `[http.tls]`
    /// certificate or key: cert-manager and certbot replace them in place) changes, checking every
    /// `every`, until `stop`. Kubernetes updates a Secret volume in place (a new `..data` symlink),
    /// so a rotated Secret reaches the daemon without a signal. The content is compared, not the
    /// modification time, so the symlink swap, an editor's rename and an in-place write all count.
    pub fn watch_secret_files(&self, path: Option<PathBuf>, every: Duration, stop: CancellationToken) {
        let reloader = self.clone();
        tokio::spawn(async move {
            let mut seen = reloader.fingerprints();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => break,
                }
                let (r, p, before) = (reloader.clone(), path.clone(), seen.clone());
                // Reading files: off the async workers.
                let checked = tokio::task::spawn_blocking(move || {
                    let now = r.fingerprints();
                    if now == before {
                        return now;
                    }
                    info!("a watched file changed; reloading the configuration");
                    // Logged and counted by `reload`. A refused reload is not retried until the
                    // content changes again.
                    let _ = r.reload(p.as_deref());
                    // The files of the configuration now in force, with the digests read before the
                    // reload: a file still being written while it was read is seen again next time.
                    let mut after = r.fingerprints();
                    for (file, digest) in &mut after {
                        if let Some((_, seen)) = now.iter().find(|(f, _)| f == file) {
                            *digest = *seen;
                        }
                    }
                    after
                })
                .await;
                match checked {
                    Ok(now) => seen = now,
                    Err(e) => warn!(error = %e, "secret file check failed"),
                }
            }
        });
    }

    /// A digest of every `<key>_file` of the configuration in force (`None` for an unreadable one).
    fn fingerprints(&self) -> Vec<(PathBuf, Option<[u8; 32]>)> {
        let files = secret_files(&self.0.current.lock().unwrap_or_else(PoisonError::into_inner));
        files
            .into_iter()
            .map(|f| {
                let digest = std::fs::read(&f).ok().map(|bytes| Sha256::digest(&bytes).into());
                (f, digest)
            })
            .collect()
    }

    fn apply_valid(&self, cfg: Config) -> Result<Applied, ReloadError> {
        let mut current = self.0.current.lock().unwrap_or_else(PoisonError::into_inner);
        for (part, hook) in self.0.hooks.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            hook(&cfg).map_err(|source| ReloadError::Part { part, source })?;
        }
        let auth = Auth::from_config(&cfg);
        let applied = Applied { tokens: auth.len(), restart_needed: restart_needed(&current, &cfg) };
        self.0.auth.replace(auth);
        *current = cfg;
        Ok(applied)
    }

    fn report(&self, result: &Result<Applied, ReloadError>) {
        let label = match result {
            Ok(applied) => {
                info!(tokens = applied.tokens, "configuration reloaded");
                if !applied.restart_needed.is_empty() {
                    warn!(
                        sections = applied.restart_needed.join(", "),
                        "configuration changed in sections a reload does not apply; restart to apply them"
                    );
                }
                ReloadResult::Applied
            }
            Err(e) => {
                warn!(error = %error_chain(e), "configuration reload refused; the old configuration stays in force");
                ReloadResult::Rejected
            }
        };
        self.0.metrics.config_reloads.with_label_values(&[label.label()]).inc();
    }
}

/// The `<key>_file` paths of `cfg`, and its `[http.tls]` files.
fn secret_files(cfg: &Config) -> Vec<PathBuf> {
    [
        &cfg.huggy.tokens_file,
        &cfg.kafka.sasl.password_file,
        &cfg.kafka.tls.key_password_file,
        &cfg.files.s3.access_key_id_file,
        &cfg.files.s3.secret_access_key_file,
    ]
    .into_iter()
    .flatten()
    .chain(cfg.huggy.accounts.iter().filter_map(|a| a.tokens_file.as_ref()))
    .cloned()
    .chain([&cfg.http.tls.cert_file, &cfg.http.tls.key_file].into_iter().filter(|f| !f.is_empty()).map(PathBuf::from))
    .collect()
}

/// Sections other than `[huggy]` whose values differ (secrets compared as they are, not redacted).
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    // `[http.tls]` is re-read by every reload; only turning it on or off needs a restart.
    let same_tls = old.http.tls.enabled() == new.http.tls.enabled();
    let sections = |c: &Config| {
        let mut c = c.clone();
        if same_tls {
            c.http.tls = crate::config::HttpTlsConfig::default();
        }
        match toml::Value::try_from(&c) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        }
    };
    let (a, b) = (sections(old), sections(new));
    let mut out: Vec<String> = b
        .iter()
        .filter(|(k, v)| k.as_str() != "huggy" && a.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    let expose = |s: &Option<crate::config::Secret>| s.as_ref().map(|s| s.expose().to_owned());
    let kafka_secrets = |c: &Config| (expose(&c.kafka.sasl.password), expose(&c.kafka.tls.key_password));
    let s3_secrets = |c: &Config| (expose(&c.files.s3.access_key_id), expose(&c.files.s3.secret_access_key));
    for (section, changed) in
        [("kafka", kafka_secrets(old) != kafka_secrets(new)), ("files", s3_secrets(old) != s3_secrets(new))]
    {
        if changed && !out.iter().any(|s| s == section) {
            out.push(section.to_owned());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn config(tokens: &[&str]) -> Config {
        let mut cfg = Config::default();
        cfg.huggy.tokens = tokens.iter().map(|t| Secret::new(*t)).collect();
        cfg
    }

    /// Which of the tokens these tests use the table accepts (it keeps digests, not the tokens).
    fn tokens(table: &AuthTable) -> Vec<&'static str> {
        let auth = table.current();
        ["a", "b", "c", "d", "fine", "refused"].into_iter().filter(|t| auth.accepts(t)).collect()
    }

    fn reloader(cfg: &Config) -> (Reloader, Arc<AuthTable>, Arc<Metrics>) {
        let auth = Arc::new(AuthTable::new(Auth::from_config(cfg)));
        let metrics = Arc::new(Metrics::new());
        (Reloader::new(cfg.clone(), auth.clone(), metrics.clone()), auth, metrics)
    }

    fn count(metrics: &Metrics, result: ReloadResult) -> u64 {
        metrics.config_reloads.with_label_values(&[result.label()]).get()
    }

    #[test]
    fn reloads_at_once_apply_in_the_order_they_read_so_the_newer_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.toml");
        let write = |token: &str| std::fs::write(&file, format!("[huggy]\ntokens = [\"{token}\"]\n")).unwrap();
        let (r, auth, _) = reloader(&config(&["a"]));
        // The first reload to read pauses between reading and applying (a slow disk, a busy core).
        let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (paused_tx, go_rx) = (Mutex::new(Some(paused_tx)), Mutex::new(go_rx));
        *r.0.between_read_and_apply.lock().unwrap() = Some(Arc::new(move || {
            let first = paused_tx.lock().unwrap().take();
            if let Some(tx) = first {
                tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
        }));
        write("b");
        let first = {
            let (r, file) = (r.clone(), file.clone());
            std::thread::spawn(move || r.reload(Some(&file)))
        };
        paused_rx.recv().unwrap();
        // The file changes again and a second reload (the watcher, a SIGHUP) runs meanwhile.
        write("c");
        let second = {
            let (r, file) = (r.clone(), file.clone());
            std::thread::spawn(move || r.reload(Some(&file)))
        };
        std::thread::sleep(Duration::from_millis(300));
        go_tx.send(()).unwrap();
        first.join().unwrap().expect("the first reload applies");
        second.join().unwrap().expect("the second reload applies");
        assert_eq!(tokens(&auth), ["c"], "the file's newest content is in force");
    }

    #[test]
    fn a_valid_configuration_swaps_the_tokens_and_names_what_needs_a_restart() {
        let (r, auth, metrics) = reloader(&config(&["a"]));
        let before = auth.current();
        let mut next = config(&["b", "c"]);
        next.kafka.partitions = 12;
        next.kafka.tls.key_password = Some(Secret::new("changed"));
        next.files.s3.secret_access_key = Some(Secret::new("changed"));
        let applied = r.apply(next).expect("applied");
        assert_eq!(applied, Applied { tokens: 2, restart_needed: vec!["files".into(), "kafka".into()] });
        assert_eq!(tokens(&auth), ["b", "c"]);
        assert!(before.len() == 1 && before.accepts("a"), "a snapshot taken before the reload keeps its tokens");
        assert_eq!(count(&metrics, ReloadResult::Applied), 1);
        assert!(r.apply(config(&["b"])).expect("applied").restart_needed.contains(&"kafka".to_owned()));
        assert!(r.apply(config(&["d"])).expect("applied").restart_needed.is_empty(), "only tokens changed");
    }

    #[test]
    fn the_tls_files_are_watched_and_a_new_pair_needs_no_restart_but_turning_tls_on_does() {
        let mut on = config(&["a"]);
        on.http.tls.cert_file = "/etc/tls/cert.pem".into();
        on.http.tls.key_file = "/etc/tls/key.pem".into();
        let files = secret_files(&on);
        assert!(
            files.contains(&PathBuf::from("/etc/tls/cert.pem")) && files.contains(&PathBuf::from("/etc/tls/key.pem"))
        );
        assert!(secret_files(&config(&["a"])).is_empty(), "no empty path is watched");
        let mut moved = on.clone();
        moved.http.tls.cert_file = "/etc/tls2/cert.pem".into();
        assert!(restart_needed(&on, &moved).is_empty(), "a new pair is applied by the reload");
        assert_eq!(restart_needed(&config(&["a"]), &on), ["http"]);
        assert_eq!(restart_needed(&on, &config(&["a"])), ["http"]);
    }

    #[test]
    fn an_invalid_configuration_or_a_refusing_part_keeps_the_old_one() {
        let (r, auth, metrics) = reloader(&config(&["a"]));
        assert!(matches!(r.apply(config(&[])), Err(ReloadError::Invalid(ConfigError::NoTokens))));
        r.on_reload("test part", |cfg| {
            if cfg.huggy.tokens.iter().any(|t| t.expose() == "refused") {
                Err("not this one".into())
            } else {
                Ok(())
            }
        });
        let e = r.apply(config(&["refused"])).unwrap_err();
        assert!(matches!(e, ReloadError::Part { part: "test part", .. }), "{e}");
        assert_eq!(tokens(&auth), ["a"]);
        assert_eq!(count(&metrics, ReloadResult::Rejected), 2);
        r.apply(config(&["fine"])).expect("the part takes it");
        assert_eq!(tokens(&auth), ["fine"]);
    }

    #[test]
    fn an_accounts_tokens_file_is_watched_and_its_tokens_counted() {
        let mut cfg = config(&["a"]);
        cfg.huggy.accounts = vec![crate::config::AccountConfig {
            company_id: "15693".into(),
            tokens: vec![Secret::new("b"), Secret::new("c")],
            tokens_file: Some("/run/secrets/account-15693".into()),
        }];
        assert!(secret_files(&cfg).contains(&PathBuf::from("/run/secrets/account-15693")));
        let (r, auth, _) = reloader(&config(&["d"]));
        assert_eq!(r.apply(cfg).expect("applied").tokens, 3, "plain and account tokens");
        assert_eq!(tokens(&auth), ["a", "b", "c"]);
        assert_eq!(auth.current().check("b").and_then(|s| s.account).as_deref(), Some("15693"));
    }
}
