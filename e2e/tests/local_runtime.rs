//! `operator local`: the sync-double-write example as local processes, driven by the
//! published `rocketmq-client-rust` client while the file is edited to scale out and back in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use broker::client::{Client, Producer};
use e2e::{Error, Proc};

fn cluster_members(namesrv: &str) -> Vec<String> {
    let out = Command::new(e2e::bin("mqadmin").unwrap())
        .args(["-n", namesrv, "clusterList"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(String::from)
        .collect()
}

async fn wait_members(namesrv: &str, want: usize, what: &str) -> Result<(), Error> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if cluster_members(namesrv).len() == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!(
        "{what}: expected {want} registered brokers, have {:?}",
        cluster_members(namesrv)
    )
    .into())
}

fn update_topic(namesrv: &str, topic: &str) {
    let out = Command::new(e2e::bin("mqadmin").unwrap())
        .args([
            "-n",
            namesrv,
            "updateTopic",
            "-t",
            topic,
            "-c",
            "sync-double-write",
            "-r",
            "4",
            "-w",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sync-double-write example.
fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/sync-double-write.yaml")
}

/// `operator local DIR/cluster.yaml` with its data in DIR/data and its log in DIR/local.log,
/// on free ports; the process and its first name server's port.
fn start_local(dir: &std::path::Path, extra: &[&str]) -> Result<(Proc, u16), Error> {
    let ns_port = e2e::free_ports(4);
    let broker_port = e2e::free_ports(80);
    let mut cmd = Command::new(e2e::bin("operator")?);
    cmd.arg("local")
        .arg(dir.join("cluster.yaml"))
        .args([
            "--namesrv-port",
            &ns_port.to_string(),
            "--broker-port",
            &broker_port.to_string(),
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "info");
    let local = Proc::spawn_logged("operator-local", cmd, dir.join("local.log"))?;
    Ok((local, ns_port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_runtime_runs_the_example_and_follows_scale_out_and_in() -> Result<(), Error> {
    let dir = e2e::test_dir("local")?;
    let file = dir.path().join("cluster.yaml");
    let text = std::fs::read_to_string(example())?;
    assert!(text.contains("masters: 2"));
    std::fs::write(&file, &text)?;
    let (mut local, ns_port) = start_local(dir.path(), &["--no-check"])?;
    let namesrv = format!("127.0.0.1:{ns_port};127.0.0.1:{}", ns_port + 2);
    wait_members(&namesrv, 4, "start").await?;
    tokio::time::sleep(Duration::from_secs(6)).await; // slaves learn their masters
    update_topic(&namesrv, "LocalTopic");

    let rt = common::Runtime::new()?;
    let producer = common::producer(&rt, &namesrv, "local_producer").await?;
    let first = common::send_range(&producer, "LocalTopic", 0..1000).await?;
    assert_eq!(first.len(), 2, "{first:?}");
    let (mut consumer, got) =
        common::push_consumer(&rt, &namesrv, "local_group", "LocalTopic").await?;
    common::wait_for(&got, 1000, Duration::from_secs(60)).await;

    // Scale out: a third group appears, the runtime gives it the cluster's topics (no
    // `updateTopic` here), and new sends reach it.
    std::fs::write(&file, text.replace("masters: 2", "masters: 3"))?;
    wait_members(&namesrv, 6, "scale out").await?;
    let client = Client::new(broker::config::split_namesrv(&namesrv));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let route = client.refresh_route("LocalTopic").await?;
        if route
            .queue_datas
            .iter()
            .any(|q| q.broker_name == "sync-double-write-broker-2" && q.write_queue_nums > 0)
        {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("local.log"))?;
            return Err(
                format!("the new group never got LocalTopic\nlocal runtime log:\n{log}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ours = Producer::new(client, "local_producer_2");
    let mut on_new_group = 0;
    for seq in 1000..1600u64 {
        let r = ours
            .send(&common::ferromq_message("LocalTopic", seq))
            .await?;
        assert!(r.is_ok(), "status {}", r.status);
        if r.broker_name == "sync-double-write-broker-2" {
            on_new_group += 1;
        }
    }
    assert!(on_new_group > 0, "no send reached the new group");
    common::wait_for(&got, 1600, Duration::from_secs(60)).await;

    // Scale back in: the third group is drained (read-only, consumers catch up) then stopped,
    // and nothing it held is lost.
    std::fs::write(&file, &text)?;
    if let Err(e) = wait_members(&namesrv, 4, "scale in").await {
        let log = std::fs::read_to_string(dir.path().join("local.log"))?;
        return Err(format!("{e}\nlocal runtime log:\n{log}").into());
    }
    consumer.shutdown().await;
    common::check_all(&got, 1600, "local runtime");
    let log = std::fs::read_to_string(dir.path().join("local.log"))?;
    assert!(
        log.contains("read-only") && log.contains("drained"),
        "{log}"
    );
    println!("local runtime: 1600 messages consumed across scale out and in; {on_new_group} sent to the added group");

    local.stop()?;
    rt.shutdown().await;
    Ok(())
}

/// Processes whose command line has `arg` as one of its arguments.
fn processes_with_arg(arg: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(arg)) {
            found.push(args.join(" "));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runtime_stopped_while_starting_leaves_no_process_behind() -> Result<(), Error> {
    let dir = e2e::test_dir("local-early-stop")?;
    std::fs::write(
        dir.path().join("cluster.yaml"),
        std::fs::read_to_string(example())?,
    )?;
    let data = dir.path().join("data");
    let (mut local, ns_port) = start_local(dir.path(), &[])?;
    // Stopped while it starts the cluster: once its first broker runs, before every member is
    // ready (the start waits for them in turn).
    let data_arg = data.to_string_lossy().into_owned();
    let start = Instant::now();
    let brokers = || -> Vec<String> {
        processes_with_arg(&data_arg)
            .into_iter()
            .filter(|p| p.contains("mqbroker"))
            .collect()
    };
    while brokers().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no broker started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    local.signal("TERM")?;
    let status = local.wait_exit(Duration::from_secs(60))?;
    assert!(status.success(), "{status}");
    let left: Vec<String> =
        brokers()
            .into_iter()
            .chain(processes_with_arg("mqnamesrv").into_iter().filter(|p| {
                p.contains(&format!(" {ns_port} ")) || p.ends_with(&format!(" {ns_port}"))
            }))
            .collect();
    assert!(left.is_empty(), "left running: {left:?}");
    Ok(())
}
