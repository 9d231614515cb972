//! The `huggy-bridge` binary: parse the command line, load the configuration, and hand over to the
//! library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use huggy_bridge::config::{Config, ConfigError};
use huggy_bridge::telemetry::error_chain;
use huggy_bridge::{app, contract, publish, replay, shutdown, spool, telemetry};
use tokio_util::sync::CancellationToken;

/// Each request allocates a few dozen small buffers on one thread that the spool writer or the
/// publisher frees on another; glibc's malloc spent 14-17 % of the daemon's CPU on that
/// (consolidating and relinking chunks). jemalloc's thread caches cut the CPU per request by a fifth
/// in spool mode and a third in kafka mode (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `EX_CONFIG` (sysexits.h): a configuration error, which a restart will not fix
/// (`RestartPreventExitStatus=78` in the systemd unit).
const EXIT_CONFIG: u8 = 78;

/// How often the daemon checks its `<key>_file` secrets for a new content (a Kubernetes Secret
/// volume takes a minute or so to show an update anyway).
const SECRET_FILES_POLL: std::time::Duration = std::time::Duration::from_secs(10);

/// How a failure of a command is reported.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    /// One line on stderr (commands run by hand).
    Stderr,
    /// One log line (the daemon: its stderr is a log).
    Log,
}

#[derive(Parser)]
#[command(name = "huggy-bridge", version, about = "Huggy webhooks in, one Kafka record per event out, durably")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (default: ./config.toml when it exists, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and print it, secrets redacted, then its worst-case memory (TOML
    /// comments: the output stays a configuration file); exit 78 on any error.
    CheckConfig {
        /// Events stored per second at the peak, for the dedup window's share of the memory figure.
        #[arg(long, default_value_t = huggy_bridge::memory::DEFAULT_PEAK_EVENTS_PER_SEC)]
        peak_events_per_sec: u64,
        /// The smallest event the batches carry, in bytes: small events cost more memory per byte.
        #[arg(long, default_value_t = huggy_bridge::memory::DEFAULT_MIN_EVENT_BYTES)]
        min_event_bytes: u64,
    },
    /// Kafka topic management.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Offline spool commands, for a spool no daemon is running on (e.g. the volume of a replica
    /// that was scaled away). They refuse to open a spool that a running process holds.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// The dead-letter topic.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Claim checks: events too large for their topic, kept in the file store.
    ClaimCheck {
        #[command(subcommand)]
        command: ClaimCheckCommand,
    },
    /// The consumer contract: what this configuration publishes, as documents.
    Contract {
        #[command(subcommand)]
        command: ContractCommand,
    },
    /// Ask a running daemon's admin listener whether it is alive (or, with --ready, ready); exit 0
    /// when it is, 1 otherwise. For container health checks where no HTTP client is installed.
    Probe {
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every topic the configuration can route to (known types, fallback, dead-letter); idempotent.
    Create,
    /// List the topics the configuration can route to.
    List,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Republish every dead-lettered record that can now be published to the topic its type routes
    /// to today (key, value, headers and ce_id kept; huggy_dlq_* dropped); print what was replayed,
    /// skipped and left. Running it again replays nothing twice.
    Replay {
        /// Only records of this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only records whose huggy_dlq_reason contains this text. Records the bridge refused by
        /// policy (company_mismatch, a lone surrogate, a duplicated key member, an invalid type
        /// name) are skipped unless their reason is named here.
        #[arg(long)]
        reason: Option<String>,
        /// Report what would be replayed; publish and record nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ClaimCheckCommand {
    /// Write the event a claim check points to (its `location`) to stdout, byte for byte.
    Get {
        location: String,
        /// Fail unless the bytes have this SHA-256 (hex, the claim check's `sha256`).
        #[arg(long)]
        sha256: Option<String>,
    },
}

#[derive(Subcommand)]
enum ContractCommand {
    /// Print the AsyncAPI 3 document (JSON) of what this configuration publishes: every topic
    /// (fallback and dead-letter included), key, headers, Kafka bindings, value schema per type.
    Asyncapi,
    /// Write the JSON Schema (draft 2020-12) of each event type's value into DIR, one file per type.
    Schemas {
        /// Directory to write `<type>.schema.json` files into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Print what the spool holds: undelivered events per type, bytes, oldest age, pending file
    /// captures, segments, damage found. Reads only; exit 0.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish everything undelivered (capturing the files its events wait for) and exit 0 once
    /// the spool is empty.
    Drain,
}

/// `--version`: the version, the commit and the spool format (clap wants a `'static` string).
static VERSION_LINE: std::sync::LazyLock<String> = std::sync::LazyLock::new(huggy_bridge::build_info::version_line);

/// Exit codes: 0 success, 78 a configuration error (every command), 1 another failure, 2 a usage
/// error (clap), 143 a second SIGTERM/SIGINT during the drain.
fn main() -> ExitCode {
    let matches = Cli::command().version(VERSION_LINE.as_str()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Commands that receive no webhooks need no webhook tokens.
    let offline = matches!(
        cli.command,
        Some(
            Command::Topics { .. }
                | Command::Spool { .. }
                | Command::Probe { .. }
                | Command::DeadLetter { .. }
                | Command::ClaimCheck { .. }
                | Command::Contract { .. }
        )
    );
    let loaded =
        if offline { Config::load_offline(cli.config.as_deref()) } else { Config::load(cli.config.as_deref()) };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("huggy-bridge: {}", error_chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = publish::kafka::check_properties(&cfg) {
        eprintln!("huggy-bridge: invalid configuration: kafka: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { peak_events_per_sec, min_event_bytes } => {
            if let Err(e) = cfg.check_tls_pair() {
                eprintln!("huggy-bridge: {}", error_chain(&e));
                return ExitCode::from(EXIT_CONFIG);
            }
            print!("{}", cfg.to_redacted_toml());
            let assumptions = huggy_bridge::memory::Assumptions { peak_events_per_sec, min_event_bytes };
            print!("\n{}", huggy_bridge::memory::worst_case(&cfg, &assumptions));
            ExitCode::SUCCESS
        }
        Command::Topics { command: TopicsCommand::List } => {
            for t in publish::kafka::routable_topics(&cfg) {
                println!("{t}");
            }
            ExitCode::SUCCESS
        }
        Command::Topics { command: TopicsCommand::Create } => {
            telemetry::init(&cfg.log);
            block_on(Report::Stderr, async {
                if cfg.kafka.is_embedded() {
                    // Nothing to create: the embedded broker starts with every routable topic.
                    for topic in publish::kafka::routable_topics(&cfg) {
                        println!("{topic}\tembedded (created when the daemon starts)");
                    }
                    return Ok(());
                }
                for (topic, outcome) in publish::kafka::create_topics(&cfg, &cfg.kafka.brokers).await? {
                    println!(
                        "{topic}\t{}",
                        if outcome == publish::kafka::TopicOutcome::Created { "created" } else { "exists" }
                    );
                }
                Ok(())
            })
        }
        Command::Spool { command: SpoolCommand::Status { json } } => match spool::offline_status(&cfg.spool.dir) {
            Ok(status) => {
                if json {
                    match serde_json::to_string_pretty(&status) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("huggy-bridge: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    print_status(&status);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("huggy-bridge: spool status: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Spool { command: SpoolCommand::Drain } => {
            telemetry::init(&cfg.log);
            block_on(Report::Stderr, async {
                let stop = CancellationToken::new();
                shutdown::cancel_on_signals(stop.clone());
                let drained = app::drain_spool(cfg, stop).await?;
                println!("drained {} events in {:.1}s", drained.events, drained.elapsed.as_secs_f64());
                Ok(())
            })
        }
        Command::DeadLetter { command: DeadLetterCommand::Replay { event_type, reason, dry_run } } => {
            telemetry::init(&cfg.log);
            block_on(Report::Stderr, async {
                let report = replay::replay(&cfg, &replay::ReplayOptions { event_type, reason, dry_run }).await?;
                write!(std::io::stdout().lock(), "{report}")?;
                Ok(())
            })
        }
        Command::ClaimCheck { command: ClaimCheckCommand::Get { location, sha256 } } => {
            block_on(Report::Stderr, async {
                let bytes = replay::claim_check_get(&cfg, &location, sha256.as_deref()).await?;
                std::io::stdout().lock().write_all(&bytes)?;
                Ok(())
            })
        }
        Command::Contract { command: ContractCommand::Asyncapi } => {
            print!("{}", contract::pretty(&contract::asyncapi(&cfg)));
            ExitCode::SUCCESS
        }
        Command::Contract { command: ContractCommand::Schemas { dir } } => match contract::write_schemas(&dir) {
            Ok(written) => {
                for path in written {
                    println!("{path}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("huggy-bridge: contract schemas: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Probe { ready } => {
            let mut addr = cfg.admin.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let url = format!("http://{addr}/{}", if ready { "readyz" } else { "healthz" });
            block_on(Report::Stderr, async move {
                let resp = reqwest::Client::new().get(&url).timeout(std::time::Duration::from_secs(3)).send().await?;
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                println!("{status} {}", body.trim());
                anyhow::ensure!(status.is_success(), "{url} answered {status}");
                Ok(())
            })
        }
        Command::Run => {
            telemetry::init(&cfg.log);
            for name in Config::ignored_env_vars() {
                tracing::debug!(variable = %name, "not a configuration section; environment variable ignored");
            }
            let path = cli.config.clone();
            block_on(Report::Log, async move {
                let stop = CancellationToken::new();
                shutdown::cancel_on_signals(stop.clone());
                // From here on SIGHUP no longer terminates the process, even during a long recovery.
                let hangups = shutdown::hangups();
                let running = app::start(cfg, stop.clone()).await?;
                running.reloader().watch_secret_files(path.clone(), SECRET_FILES_POLL, stop.clone());
                shutdown::reload_on_hangup(hangups, running.reloader(), path, stop);
                running.wait().await
            })
        }
    }
}

fn print_status(s: &spool::OfflineStatus) {
    println!("spool:               {}", s.dir.display());
    println!("undelivered events:  {}", s.undelivered_events);
    for (t, n) in &s.by_type {
        println!("  {t:<32} {n}");
    }
    println!("undelivered bytes:   {}", s.undelivered_bytes);
    match s.oldest_age_secs {
        Some(age) => println!("oldest undelivered:  {age}s ago"),
        None => println!("oldest undelivered:  -"),
    }
    println!("pending file captures: {}", s.pending_file_captures);
    println!("segments:            {} ({} bytes on disk)", s.segments, s.disk_bytes);
    let d = &s.damage;
    if d.damaged_regions > 0 || d.torn_tails > 0 {
        println!(
            "damage:              {} damaged regions ({} bytes, {} events lost), {} torn tails",
            d.damaged_regions, d.damaged_bytes, d.events_lost, d.torn_tails
        );
    }
}

/// Runs `fut` on a multi-threaded runtime; a failure is reported once, as `report` says, and exits
/// 78 when a configuration error caused it, else 1.
fn block_on(report: Report, fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("huggy-bridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(fut);
    // A blocking task a drain left behind when its budget ran out (waiting on a spool disk hung in
    // fsync) must not hold the exit: everything acknowledged is durable already.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match report {
                Report::Log => tracing::error!(error = format!("{e:#}"), "huggy-bridge failed"),
                Report::Stderr => eprintln!("huggy-bridge: {e:#}"),
            }
            if e.chain().any(|c| c.is::<ConfigError>()) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocking_task_left_behind_by_the_drain_does_not_hold_the_exit() {
        let began = std::time::Instant::now();
        let _ = block_on(Report::Stderr, async {
            // What a drain that ran out of time leaves: a join of a thread stuck in fsync.
            drop(tokio::task::spawn_blocking(|| std::thread::sleep(std::time::Duration::from_secs(30))));
            Ok(())
        });
        assert!(began.elapsed() < std::time::Duration::from_secs(10), "exit held for {:?}", began.elapsed());
    }
}
