//! Names the commit the binary is built from, for `--version` and `huggy_bridge_build_info`.
//!
//! From git when the source is a checkout (`git rev-parse HEAD`, `-dirty` when tracked files differ
//! from it); otherwise from `HUGGY_BRIDGE_COMMIT` (the Docker build passes it as a build argument,
//! because the build context carries no `.git`); otherwise `unknown`. The result reaches the crate as
//! `BRIDGE_BUILD_COMMIT` — outside the `HUGGY_BRIDGE_` prefix on purpose: cargo also sets it when it
//! runs the tests, and the configuration loader reads every `HUGGY_BRIDGE_*` variable.

use std::path::Path;
use std::process::Command;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir);
    println!("cargo:rerun-if-env-changed=HUGGY_BRIDGE_COMMIT");
    let commit = match from_git(root) {
        Some(commit) => commit,
        None => from_env().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=BRIDGE_BUILD_COMMIT={commit}");
}

/// HEAD of the checkout at `root`, only when `root` itself is one: a copy of the sources inside
/// another repository's directory (a build context under `target/`) must not borrow that one's commit.
fn from_git(root: &Path) -> Option<String> {
    if !root.join(".git").exists() {
        return None;
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").arg("-C").arg(root).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "HEAD"])?;
    // Run again when HEAD moves (a commit, a checkout) or a source changes (dirty or clean again).
    // Only files that exist: a missing one would run this script, and rebuild the crate, every time.
    let mut watched: Vec<String> = ["src", "build.rs", "Cargo.toml", "Cargo.lock"].map(String::from).to_vec();
    let mut git_paths = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    git_paths.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    watched.extend(git_paths.iter().filter_map(|p| git(&["rev-parse", "--git-path", p])));
    for path in watched.iter().map(|p| root.join(p)).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // --no-optional-locks: status must not refresh (rewrite) the index of the checkout it reads.
    let dirty =
        git(&["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

/// `HUGGY_BRIDGE_COMMIT`, when set: a commit id or a short version-control tag, nothing that could
/// break a metric label or a log line.
fn from_env() -> Option<String> {
    let value = std::env::var("HUGGY_BRIDGE_COMMIT").ok()?;
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let valid = value.len() <= 64 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        panic!("HUGGY_BRIDGE_COMMIT={value:?}: expected a commit id (at most 64 letters, digits, '.', '_' or '-')");
    }
    Some(value.to_owned())
}
