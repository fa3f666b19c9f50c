//! Log set-up shared by the binaries: `RUST_LOG`-style filtering, to stderr.

/// Installs the global subscriber; `default` applies when `RUST_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (the log's disk full, its reader gone) is lost,
        // nothing more: by default the subscriber reports it with `eprintln!`, which panics
        // when stderr fails, and took down whichever thread was logging (the flush thread,
        // the disk watch, send handlers).
        .log_internal_errors(false)
        .try_init();
}

/// Writes a line to stderr for the person who started the process (a start failure, the
/// boot banner); a stderr that cannot be written loses the line instead of panicking as
/// `eprintln!` does.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Resolves when the process is asked to stop (SIGINT, SIGTERM, or SIGHUP: its terminal or
/// session went away; the JVM runs its shutdown hooks on it too, and without a handler the
/// process would die without a clean checkpoint). A signal that was ignored when the process
/// started (SIGHUP under `nohup`, SIGINT for a job started with `&` by a script) stays
/// ignored, as the JVM leaves it.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let ignored = ignored_signals();
        // Bit n-1 of the mask is signal n: SIGHUP 1, SIGINT 2, SIGTERM 15.
        let listen = |kind: SignalKind, number: u32| {
            (ignored & (1 << (number - 1)) == 0)
                .then(|| signal(kind).ok())
                .flatten()
        };
        let on = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = on(listen(SignalKind::interrupt(), 2)) => {}
            _ = on(listen(SignalKind::terminate(), 15)) => {}
            _ = on(listen(SignalKind::hangup(), 1)) => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The signals ignored when the process started, from the `SigIgn` mask in /proc (no unsafe
/// call needed); none where /proc cannot tell.
#[cfg(unix)]
fn ignored_signals() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(sig_ignored_mask)
        .unwrap_or(0)
}

/// The `SigIgn` mask of a /proc status text (bit n-1 is signal n).
fn sig_ignored_mask(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("SigIgn:"))?;
    u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ignored_signals_are_read_from_proc() {
        let status = "Name:\tmqbroker\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n";
        assert_eq!(sig_ignored_mask(status), Some(0x1001));
        assert_eq!(sig_ignored_mask("Name: x\n"), None);
    }
}
