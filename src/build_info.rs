//! Which build this is: the version, the commit it was built from (`build.rs`: git, else the
//! `HUGGY_BRIDGE_COMMIT` variable of the build, else `unknown`) and the spool format it writes.
//! `--version` prints them; `huggy_bridge_build_info` exports them.

/// The crate's version (semver; the CHANGELOG says what each one changed).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit the binary was built from; `-dirty` when tracked files differed from it.
pub const COMMIT: &str = env!("BRIDGE_BUILD_COMMIT");
/// The on-disk spool format this build writes, and the only one it reads.
pub const SPOOL_FORMAT: u32 = crate::spool::FORMAT_VERSION;

/// `0.2.0 (commit 1a2b…, spool format 3)`: what `--version` prints after the program's name.
pub fn version_line() -> String {
    format!("{VERSION} (commit {COMMIT}, spool format {SPOOL_FORMAT})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_names_version_commit_and_spool_format() {
        let line = version_line();
        assert!(line.starts_with(env!("CARGO_PKG_VERSION")), "{line}");
        assert!(!COMMIT.is_empty(), "build.rs always sets a commit");
        assert!(line.contains(&format!("commit {COMMIT},")), "{line}");
        assert!(line.ends_with(&format!("spool format {SPOOL_FORMAT})")), "{line}");
    }
}
