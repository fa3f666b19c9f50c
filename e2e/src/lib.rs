//! Test harness: starts `mqnamesrv` and `mqbroker` as real processes on 127.0.0.1 with their
//! own ports and data directories, and kills them the hard way when a test asks.
//!
//! The binaries are taken from the Cargo target directory this test runs from; build them first
//! (`cargo build --workspace --bins`, which the README's test command does).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Error type of the harness: tests fail with its message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Where the workspace's binaries are (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERROMQ_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of one of our binaries, or an error telling how to build it.
pub fn bin(name: &str) -> Result<PathBuf, Error> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: run `cargo build --workspace --bins` before the tests (or set FERROMQ_BIN_DIR)",
            p.display()
        )
        .into())
    }
}

/// A port base with `n` consecutive free ports, below the kernel's ephemeral range: a port
/// taken from that range (by binding port 0) can be handed, before the broker binds it, to
/// any outgoing connection of the tests running in parallel as its source port.
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|h| *h > LOW + 1_000)
        .unwrap_or(32_768);
    let span = high - LOW - u32::from(n);
    // Test binaries run one after another, but each starts where the previous ones may still
    // have brokers shutting down: start each process somewhere else in the range.
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() % span + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let step = NEXT.fetch_add(u32::from(n), Ordering::Relaxed);
        let base = (LOW + step % span) as u16;
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// Whether something accepts connections on 127.0.0.1:`port` within `timeout`.
pub fn wait_tcp(port: u16, timeout: Duration) -> bool {
    wait_tcp_at(&format!("127.0.0.1:{port}"), timeout)
}

/// Whether something accepts connections on `addr` (`host:port`) within `timeout`.
pub fn wait_tcp_at(addr: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process that is killed when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Name for messages.
    pub name: String,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn_logged(name: &str, cmd: Command, log: PathBuf) -> Result<Proc, Error> {
        Proc::spawn(name, cmd, log)
    }

    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, Error> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            child: Some(child),
            name: name.to_string(),
            log,
        })
    }

    /// SIGKILL: no flush, no clean shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<(), Error> {
        if self.child.is_none() {
            return Ok(());
        }
        // A process that already exited is waited for all the same.
        let _ = self.signal("TERM");
        match self.wait_exit(Duration::from_secs(20)) {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!(
                "{} exited with {status}; log {}",
                self.name,
                self.log.display()
            )
            .into()),
            Err(_) => {
                self.kill9();
                Err(format!("{} did not stop within 20 s", self.name).into())
            }
        }
    }

    /// Waits up to `within` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus, Error> {
        let c = self.child.as_mut().ok_or("process not running")?;
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > within {
                return Err(format!("{} did not exit within {within:?}", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) -> Result<(), Error> {
        let c = self.child.as_ref().ok_or("process not running")?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()?;
        if !status.success() {
            return Err(format!("kill -{sig} {} failed", c.id()).into());
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running name server.
pub struct NameServer {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:port` (or the address it was started on).
    pub addr: String,
}

impl NameServer {
    /// Starts a name server in `dir` with a broker expiry of `broker_timeout_ms`.
    pub fn start(dir: &Path, broker_timeout_ms: u64) -> Result<NameServer, Error> {
        NameServer::start_at(dir, broker_timeout_ms, "127.0.0.1")
    }

    /// [`NameServer::start`] listening on `ip` alone (`::1` for IPv6).
    pub fn start_at(dir: &Path, broker_timeout_ms: u64, ip: &str) -> Result<NameServer, Error> {
        let port = free_ports(2);
        let mut cmd = Command::new(bin("mqnamesrv")?);
        cmd.args([
            "--bind",
            ip,
            "-p",
            &port.to_string(),
            "--http-port",
            &(port + 1).to_string(),
        ])
        .arg("--broker-timeout-ms")
        .arg(broker_timeout_ms.to_string())
        .env("RUST_LOG", "info");
        let proc = Proc::spawn("mqnamesrv", cmd, dir.join(format!("namesrv-{port}.log")))?;
        let addr = broker::net::host_port(ip, port);
        if !wait_tcp_at(&addr, Duration::from_secs(10)) {
            return Err(format!(
                "name server did not open {addr}; log {}",
                proc.log.display()
            )
            .into());
        }
        Ok(NameServer { proc, addr })
    }
}

/// How to configure a broker under test.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    /// brokerName.
    pub name: String,
    /// brokerId.
    pub id: i64,
    /// brokerRole.
    pub role: String,
    /// flushDiskType.
    pub flush: String,
    /// Extra broker.conf lines.
    pub extra: Vec<String>,
}

impl BrokerSpec {
    /// An ASYNC_MASTER named `name` with the given flush policy.
    pub fn master(name: &str, flush: &str) -> BrokerSpec {
        BrokerSpec::member(name, 0, "ASYNC_MASTER", flush)
    }

    /// A member of group `name` with the given id and role.
    pub fn member(name: &str, id: i64, role: &str, flush: &str) -> BrokerSpec {
        BrokerSpec {
            name: name.into(),
            id,
            role: role.into(),
            flush: flush.into(),
            extra: Vec::new(),
        }
    }

    /// Adds broker.conf lines.
    pub fn with(mut self, lines: &[&str]) -> BrokerSpec {
        self.extra.extend(lines.iter().map(|l| l.to_string()));
        self
    }
}

/// A running (or stopped) broker with a persistent data directory.
pub struct Broker {
    /// The process, if running.
    pub proc: Option<Proc>,
    /// Remoting address.
    pub addr: String,
    /// HTTP port.
    pub http_port: u16,
    /// Data directory.
    pub store: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    name: String,
}

impl Broker {
    /// Writes a broker.conf for `spec` under `dir` and starts the broker.
    pub fn start(dir: &Path, spec: &BrokerSpec, namesrv: &[&str]) -> Result<Broker, Error> {
        let mut b = Broker::configure(dir, spec, namesrv)?;
        b.restart()?;
        Ok(b)
    }

    /// Writes a broker.conf for `spec` under `dir` without starting anything.
    pub fn configure(dir: &Path, spec: &BrokerSpec, namesrv: &[&str]) -> Result<Broker, Error> {
        let port = free_ports(3);
        let store = dir.join(format!("store-{}-{}-{port}", spec.name, spec.id));
        let conf = dir.join(format!("{}-{}-{port}.conf", spec.name, spec.id));
        let mut f = std::fs::File::create(&conf)?;
        writeln!(f, "brokerClusterName=TestCluster")?;
        writeln!(f, "brokerName={}", spec.name)?;
        writeln!(f, "brokerId={}", spec.id)?;
        writeln!(f, "brokerRole={}", spec.role)?;
        writeln!(f, "flushDiskType={}", spec.flush)?;
        let ip = spec
            .extra
            .iter()
            .find_map(|l| l.strip_prefix("brokerIP1="))
            .unwrap_or("127.0.0.1")
            .to_string();
        if !spec.extra.iter().any(|l| l.starts_with("brokerIP1=")) {
            writeln!(f, "brokerIP1={ip}")?;
        }
        writeln!(f, "listenPort={port}")?;
        writeln!(f, "haListenPort={}", port + 1)?;
        writeln!(f, "httpPort={}", port + 2)?;
        writeln!(f, "namesrvAddr={}", namesrv.join(";"))?;
        writeln!(f, "storePathRootDir={}", store.display())?;
        if !spec
            .extra
            .iter()
            .any(|l| l.starts_with("registerNameServerPeriod"))
        {
            writeln!(f, "registerNameServerPeriod=2000")?;
        }
        for l in &spec.extra {
            writeln!(f, "{l}")?;
        }
        drop(f);
        Ok(Broker {
            proc: None,
            addr: broker::net::host_port(&ip, port),
            http_port: port + 2,
            store,
            conf,
            dir: dir.to_path_buf(),
            name: format!("{}-{}-{port}", spec.name, spec.id),
        })
    }

    /// Starts the broker process again on the same ports and data, and waits until it is
    /// ready.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.spawn()?;
        self.wait_ready()
    }

    /// Starts the broker process without waiting for it to become ready.
    pub fn spawn(&mut self) -> Result<(), Error> {
        let mut cmd = Command::new(bin("mqbroker")?);
        cmd.arg("-c").arg(&self.conf).env("RUST_LOG", "info");
        self.proc = Some(Proc::spawn("mqbroker", cmd, self.log_path())?);
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("broker-{}.log", self.name))
    }

    /// The broker's log so far (all of its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let running = self.proc.as_mut().is_some_and(Proc::running);
            if !running {
                return Err(format!("broker exited at start:\n{}", self.log_text()).into());
            }
            if http_ok(self.http_port, "/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "broker not ready within 30 s; log {}",
            self.log_path().display()
        )
        .into())
    }

    /// SIGKILL the broker.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Stops the broker cleanly.
    pub fn stop(&mut self) -> Result<(), Error> {
        match self.proc.take() {
            Some(mut p) => p.stop(),
            None => Ok(()),
        }
    }
}

/// GETs `path` on 127.0.0.1:`port`; true on a 200 answer.
pub fn http_ok(port: u16, path: &str) -> bool {
    http_get(port, path).is_some_and(|(code, _)| code == 200)
}

/// GETs `path` on 127.0.0.1:`port`: status code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A temp directory that is kept (and reported) when the test fails.
pub fn test_dir(name: &str) -> Result<tempfile::TempDir, Error> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("ferromq-{name}-"))
        .tempdir()?)
}
