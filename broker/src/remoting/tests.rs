//! Codec tests: Java's leniency, both header serializations, limits, and random input.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use super::command::{language_from_name, SerializeType};
use super::*;

fn json_frame(header: &str, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32((4 + header.len() + body.len()) as u32);
    b.put_u32(header.len() as u32);
    b.put_slice(header.as_bytes());
    b.put_slice(body);
    b
}

fn decode_one(mut b: BytesMut) -> Result<Option<RemotingCommand>, RemotingError> {
    FrameCodec::new(1 << 20).decode(&mut b)
}

#[test]
fn java_style_json_header_decodes_with_scalars_of_any_type_in_ext_fields() {
    let h = r#"{"code":310,"extFields":{"a":"pg","b":"T","e":3,"k":false,"g":1700000000000,"n":null},"flag":0,"language":"JAVA","opaque":17,"serializeTypeCurrentRPC":"JSON","version":453}"#;
    let cmd = decode_one(json_frame(h, b"body")).unwrap().unwrap();
    assert_eq!(cmd.code, 310);
    assert_eq!(cmd.opaque, 17);
    assert_eq!(cmd.language, 0);
    assert_eq!(cmd.ext_fields.get("e"), Some("3"));
    assert_eq!(cmd.ext_fields.get("k"), Some("false"));
    assert_eq!(cmd.ext_fields.get("g"), Some("1700000000000"));
    assert!(!cmd.ext_fields.contains_key("n"));
    assert_eq!(&cmd.body[..], b"body");
    assert_eq!(cmd.serialize_type, SerializeType::Json);
}

#[test]
fn json_header_with_missing_fields_numeric_language_and_empty_remark_decodes() {
    let cmd = decode_one(json_frame(
        r#"{"code":"34","language":12,"remark":""}"#,
        b"",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(cmd.code, 34);
    assert_eq!(cmd.language, 12);
    assert_eq!(cmd.opaque, 0);
    assert_eq!(cmd.remark.as_deref(), Some(""));
    let cmd = decode_one(json_frame(
        r#"{"code":11,"language":"SOMETHING_NEW","extFields":null}"#,
        b"",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(cmd.language, language_from_name("OTHER"));
}

#[test]
fn headers_with_more_fields_than_any_real_one_are_refused_in_both_forms() {
    use super::ext::MAX_FIELDS;
    for ser in [SerializeType::Json, SerializeType::RocketMq] {
        for (n, ok) in [(MAX_FIELDS, true), (MAX_FIELDS + 1, false)] {
            let mut cmd = RemotingCommand {
                code: 14,
                serialize_type: ser,
                ..Default::default()
            };
            for i in 0..n {
                cmd.ext_fields.insert(&format!("k{i}"), "v");
            }
            let mut b = BytesMut::from(&cmd.to_bytes()[..]);
            let back = FrameCodec::default().decode(&mut b);
            assert_eq!(back.is_ok(), ok, "{ser:?} with {n} fields: {back:?}");
        }
    }
}

#[test]
fn responses_use_the_request_serialization_and_echo_opaque() {
    for ser in [SerializeType::Json, SerializeType::RocketMq] {
        let req = RemotingCommand {
            code: 14,
            opaque: 99,
            serialize_type: ser,
            ..Default::default()
        };
        let resp = req
            .error_to(ResponseCode::QueryNotFound, "nope")
            .with_ext("offset", 5);
        let mut b = BytesMut::from(&resp.to_bytes()[..]);
        let back = FrameCodec::default().decode(&mut b).unwrap().unwrap();
        assert_eq!(back.serialize_type, ser);
        assert_eq!(back.opaque, 99);
        assert!(back.is_response());
        assert_eq!(back.remark.as_deref(), Some("nope"));
        assert_eq!(back.ext_fields.get("offset"), Some("5"));
    }
}

#[test]
fn oversized_frame_is_refused_before_buffering_it() {
    let mut b = BytesMut::new();
    b.put_u32(u32::MAX);
    b.put_u32(0);
    let err = decode_one(b).unwrap_err();
    assert!(matches!(err, RemotingError::FrameTooLarge { .. }), "{err}");
}

#[test]
fn partial_frame_waits_for_more_bytes() {
    let full = json_frame(r#"{"code":34}"#, b"xyz");
    let mut codec = FrameCodec::default();
    let mut part = BytesMut::from(&full[..full.len() - 1]);
    assert!(codec.decode(&mut part).unwrap().is_none());
    part.put_u8(full[full.len() - 1]);
    assert!(codec.decode(&mut part).unwrap().is_some());
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    // Header longer than the frame.
    let mut b = BytesMut::new();
    b.put_u32(8);
    b.put_u32(100);
    b.put_u32(0);
    assert!(matches!(
        decode_one(b),
        Err(RemotingError::HeaderLength { .. })
    ));
    // Bad JSON.
    assert!(matches!(
        decode_one(json_frame("{not json", b"")),
        Err(RemotingError::Json(_))
    ));
    // A JSON header that is not UTF-8 (a stray byte inside a string).
    let mut b = json_frame(r#"{"code":10,"remark":"x?"}"#, b"");
    let at = b.iter().position(|&c| c == b'?').unwrap();
    b[at] = 0xff;
    assert!(matches!(
        decode_one(b),
        Err(RemotingError::NotUtf8("the JSON header"))
    ));
    // Unknown serialize type.
    let mut b = json_frame("{}", b"");
    b[4] = 7;
    assert!(matches!(
        decode_one(b),
        Err(RemotingError::UnknownSerializeType(7))
    ));
    // Frame shorter than its header-info word.
    let mut b = BytesMut::new();
    b.put_u32(2);
    b.put_u16(0);
    assert!(decode_one(b).is_err());
}

#[test]
fn unknown_request_code_is_not_in_the_enum() {
    assert_eq!(
        RequestCode::from_code(310),
        Some(RequestCode::SendMessageV2)
    );
    assert_eq!(RequestCode::from_code(9999), None);
    for c in RequestCode::ALL {
        assert_eq!(RequestCode::from_code(c.code()), Some(*c));
    }
}

/// Frames captured from real clients (see tests/fixtures/README.md) decode into the commands
/// they carried.
#[test]
fn golden_frames_of_real_clients_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("bin") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::default();
        let mut n = 0;
        while let Some(cmd) = codec
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            assert!(cmd.code > 0, "{}: frame {n} has no code", path.display());
            // Re-encoding and decoding again gives the same command.
            let mut again = BytesMut::from(&cmd.to_bytes()[..]);
            assert_eq!(codec.decode(&mut again).unwrap().unwrap(), cmd);
            n += 1;
        }
        assert!(buf.is_empty(), "{}: trailing bytes", path.display());
        assert!(n > 0, "{}: no frames", path.display());
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected golden frame files in {}",
        dir.display()
    );
}

fn arb_command() -> impl Strategy<Value = RemotingCommand> {
    (
        any::<i16>(),
        0u8..14,
        any::<i16>(),
        any::<i32>(),
        0i32..4,
        proptest::option::of("[ -~]{0,20}"),
        proptest::collection::hash_map("[a-zA-Z]{1,8}", "[ -~]{0,16}", 0..6),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(
            |(code, language, version, opaque, flag, remark, ext, body, binary)| RemotingCommand {
                code: i32::from(code),
                language,
                version: i32::from(version),
                opaque,
                flag,
                remark: remark.filter(|r| !r.is_empty()),
                ext_fields: ext.into_iter().collect(),
                body: Bytes::from(body),
                serialize_type: if binary {
                    SerializeType::RocketMq
                } else {
                    SerializeType::Json
                },
            },
        )
}

/// The JSON header as serde_json writes it from a struct: what the hand-written encoder must
/// match byte for byte.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferenceJsonHeader<'a> {
    code: i32,
    language: &'static str,
    version: i32,
    opaque: i32,
    flag: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    remark: Option<&'a str>,
    #[serde(skip_serializing_if = "ExtFields::is_empty")]
    ext_fields: &'a ExtFields,
    serialize_type_current_r_p_c: &'static str,
}

fn json_header_bytes(cmd: &RemotingCommand) -> Vec<u8> {
    let frame = cmd.to_bytes();
    let header_len = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) & 0xff_ffff;
    frame[8..8 + header_len as usize].to_vec()
}

fn reference_json_header(cmd: &RemotingCommand) -> Vec<u8> {
    serde_json::to_vec(&ReferenceJsonHeader {
        code: cmd.code,
        language: command::language_name(cmd.language),
        version: cmd.version,
        opaque: cmd.opaque,
        flag: cmd.flag,
        remark: cmd.remark.as_deref(),
        ext_fields: &cmd.ext_fields,
        serialize_type_current_r_p_c: "JSON",
    })
    .unwrap()
}

#[test]
fn every_ascii_character_is_escaped_as_serde_json_escapes_it() {
    let ascii: String = (0u8..128).map(char::from).collect();
    let cmd = RemotingCommand {
        remark: Some(format!("{ascii}é{ascii}")),
        ext_fields: [(ascii.as_str(), ascii.as_str()), ("i", "UNIQ\u{1}x\u{2}")]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let ours = json_header_bytes(&cmd);
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&reference_json_header(&cmd))
    );
    assert!(String::from_utf8_lossy(&ours).contains(r#""UNIQ\u0001x\u0002""#));
}

proptest! {
    #[test]
    fn json_headers_are_written_as_serde_json_writes_them(
        code in any::<i32>(),
        language in any::<u8>(),
        version in any::<i32>(),
        opaque in any::<i32>(),
        flag in any::<i32>(),
        remark in proptest::option::of(any::<String>()),
        ext in proptest::collection::vec((any::<String>(), any::<String>()), 0..6),
    ) {
        let cmd = RemotingCommand {
            code,
            language,
            version,
            opaque,
            flag,
            remark,
            ext_fields: ext.into_iter().collect(),
            ..Default::default()
        };
        let reference = reference_json_header(&cmd);
        let ours = json_header_bytes(&cmd);
        prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&reference));
    }

    #[test]
    fn commands_round_trip_in_both_serializations(cmd in arb_command()) {
        let mut b = BytesMut::from(&cmd.to_bytes()[..]);
        let back = FrameCodec::default().decode(&mut b).unwrap().unwrap();
        prop_assert_eq!(back, cmd);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = BytesMut::from(&data[..]);
        let mut codec = FrameCodec::new(4096);
        while let Ok(Some(_)) = codec.decode(&mut b) {}
    }

    #[test]
    fn mutated_frames_never_panic(cmd in arb_command(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = cmd.to_bytes().to_vec();
        for (pos, val) in flips {
            let i = pos % bytes.len();
            bytes[i] = val;
        }
        let mut b = BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::new(1 << 16);
        while let Ok(Some(_)) = codec.decode(&mut b) {}
    }
}
