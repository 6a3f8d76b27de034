//! What tests share: how a test that cannot run here says so. A skipped test passes, so where
//! every test must run (`scripts/test` sets `AGENTOS_TEST_NO_SKIP`), a skip is a failure.

/// Set to make a test that would skip fail instead.
pub const NO_SKIP_ENV: &str = "AGENTOS_TEST_NO_SKIP";

/// Skips the calling test (returns false after saying why), or fails it under
/// [`NO_SKIP_ENV`].
pub fn skip(why: &str) -> bool {
    assert!(
        std::env::var_os(NO_SKIP_ENV).is_none(),
        "this test cannot run here ({why}), and {NO_SKIP_ENV} is set"
    );
    eprintln!("skipping: {why}");
    false
}

/// Whether the test runs as root; otherwise skips it (see [`skip`]), saying it needs root to
/// `what`.
pub fn is_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip(&format!("it needs root to {what}"))
}
