//! Log set-up shared by the binaries: `RUST_LOG`-style filtering, to stderr.

/// Installs the global subscriber; `default` applies when `RUST_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when the process is asked to stop (Ctrl-C, SIGTERM, or SIGHUP: its terminal or
/// session went away; the JVM runs its shutdown hooks on it too, and without a handler the
/// process would die without a clean checkpoint). A SIGHUP that was ignored when the process
/// started (`nohup`) stays ignored, as the JVM leaves it.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let hup = if hangup_ignored() {
            None
        } else {
            signal(SignalKind::hangup()).ok()
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
            _ = ctrl_c => {}
            _ = on(term.ok()) => {}
            _ = on(hup) => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Whether SIGHUP was ignored when the process started (`nohup`), read from the `SigIgn`
/// mask in /proc (no unsafe call needed).
#[cfg(unix)]
fn hangup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(sig_ignored_mask)
        .is_some_and(|mask| mask & 1 != 0)
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
