//! Micro-benchmarks of the broker's hot paths: frame decode/encode (both header
//! serializations), stored-message encode, commit-log append through the store, and
//! consume-queue lookup. Run with `cargo bench -p broker`.

use std::hint::black_box;
use std::net::SocketAddr;

use broker::remoting::header::SendMessageRequestHeader;
use broker::remoting::{FrameCodec, RemotingCommand, RequestCode, SerializeType};
use broker::store::message::{format_properties, tag_hash, NewMessage, Properties, PROP_TAGS};
use broker::store::{FlushDiskType, MessageStore, StoreConfig};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

const BODY: usize = 1024;

fn send_request(ser: SerializeType) -> RemotingCommand {
    let h = SendMessageRequestHeader {
        producer_group: "bench_producer".into(),
        topic: "BenchmarkTest".into(),
        default_topic: Some("TBW102".into()),
        default_topic_queue_nums: Some(4),
        queue_id: Some(3),
        sys_flag: Some(0),
        born_timestamp: Some(1_764_000_000_000),
        flag: Some(0),
        properties: Some(
            "UNIQ_KEY\u{1}0000AB12000001939F0F0A2B00000001\u{2}WAIT\u{1}true\u{2}".into(),
        ),
        reconsume_times: Some(0),
        unit_mode: false,
        max_reconsume_times: None,
        batch: false,
        broker_name: Some("broker-a".into()),
    };
    let mut cmd = RemotingCommand::request(RequestCode::SendMessageV2.code(), h.to_v2())
        .with_body(Bytes::from(vec![b'x'; BODY]));
    cmd.serialize_type = ser;
    cmd.opaque = 42;
    cmd
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    for (name, ser) in [
        ("json", SerializeType::Json),
        ("rocketmq", SerializeType::RocketMq),
    ] {
        let cmd = send_request(ser);
        let mut encoded = BytesMut::new();
        if FrameCodec::default()
            .encode(cmd.clone(), &mut encoded)
            .is_err()
        {
            return;
        }
        g.bench_function(format!("encode_send_{name}"), |b| {
            let mut codec = FrameCodec::default();
            let mut dst = BytesMut::with_capacity(4096);
            b.iter(|| {
                dst.clear();
                let _ = codec.encode(black_box(cmd.clone()), &mut dst);
                black_box(dst.len())
            })
        });
        g.bench_function(format!("decode_send_{name}"), |b| {
            let mut codec = FrameCodec::default();
            b.iter_batched(
                || encoded.clone(),
                |mut src| black_box(codec.decode(&mut src).ok().flatten()),
                BatchSize::SmallInput,
            )
        });
        // What the broker does with each send: the frame, then its typed header.
        g.bench_function(format!("decode_send_header_{name}"), |b| {
            let mut codec = FrameCodec::default();
            b.iter_batched(
                || encoded.clone(),
                |mut src| {
                    let cmd = codec.decode(&mut src).ok().flatten();
                    black_box(cmd.map(|c| SendMessageRequestHeader::from_v2(&c.ext_fields)))
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn new_message(queue_id: i32) -> NewMessage {
    let mut p = Properties::new();
    p.insert(PROP_TAGS.into(), "TagA".into());
    p.insert("UNIQ_KEY".into(), "0000AB12000001939F0F0A2B00000001".into());
    NewMessage {
        topic: "BenchmarkTest".into(),
        queue_id,
        flag: 0,
        body: Bytes::from(vec![b'x'; BODY]),
        properties: format_properties(&p),
        sys_flag: 0,
        born_timestamp: 1_764_000_000_000,
        born_host: SocketAddr::from(([127, 0, 0, 1], 50_000)),
        reconsume_times: 0,
        tags_code: tag_hash("TagA"),
    }
}

fn store_config(root: &std::path::Path) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        segment_size: 256 * 1024 * 1024,
        flush: FlushDiskType::Async,
        flush_interval_ms: 500,
        flush_least_pages: 4,
        flush_thorough_interval_ms: 10_000,
        sync_flush_timeout_ms: 5_000,
        store_host: SocketAddr::from(([127, 0, 0, 1], 10_911)),
        prepare_ahead: true,
        delay_levels_ms: broker::store::message::DELAY_LEVELS_MS.into(),
        disk_full_ratio: 0.90,
        // The key index is built by a thread of its own, behind the appends measured here.
        index: None,
    }
}

fn message_encode(c: &mut Criterion) {
    let m = new_message(0);
    let host = SocketAddr::from(([127, 0, 0, 1], 10_911));
    let mut g = c.benchmark_group("message");
    g.throughput(Throughput::Bytes(m.stored_len(&host) as u64));
    g.bench_function("encode_1KiB", |b| {
        let mut dst = BytesMut::with_capacity(4096);
        b.iter(|| {
            dst.clear();
            m.encode(&mut dst, 7, 1 << 20, 1_764_000_000_001, &host);
            black_box(dst.len())
        })
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let Ok(store) = MessageStore::open(store_config(dir.path())) else {
        return;
    };
    let msgs: Vec<NewMessage> = (0..8).map(new_message).collect();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("append_1KiB", |b| {
        b.iter(|| {
            i += 1;
            black_box(
                store
                    .append(std::slice::from_ref(&msgs[i % msgs.len()]))
                    .ok(),
            )
        })
    });
    g.throughput(Throughput::Elements(32));
    g.bench_function("get_32_from_queue", |b| {
        let max = store
            .queue("BenchmarkTest", 0)
            .map_or(0, |q| q.max_offset());
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 32) % max.saturating_sub(32).max(1);
            black_box(
                store
                    .get("BenchmarkTest", 0, off, 32, 256 * 1024, |_| true)
                    .ok(),
            )
        })
    });
    g.bench_function("consume_queue_lookup_32", |b| {
        let Some(cq) = store.queue("BenchmarkTest", 0) else {
            return;
        };
        let max = cq.max_offset();
        let mut off = 0u64;
        b.iter(|| {
            off = (off + 32) % max.saturating_sub(32).max(1);
            black_box(cq.get(off, 32).ok())
        })
    });
    g.finish();
    store.shutdown();
}

// The macro generates an undocumented public function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, frames, message_encode, store);
}
use group::benches;
criterion_main!(benches);
