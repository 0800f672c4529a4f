//! SPDY/3.1 frames: round trips, partial input, limits, malformed input, and both
//! directions against the framer Kubernetes uses (github.com/moby/spdystream).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::{path::Path, process::Command};

use fleetlet_spdy::{Codec, Error, Frame, Headers, Setting, rst, settings};

/// What a kubelet session sees from an apiserver for `kubectl exec -i`, and more.
fn session() -> Vec<Frame> {
    vec![
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: settings::INITIAL_WINDOW_SIZE,
                value: 65536,
            }],
        },
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::from([("streamtype", "error")]),
        },
        Frame::SynStream {
            stream_id: 3,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::from([("streamtype", "stdin")]),
        },
        Frame::SynStream {
            stream_id: 5,
            associated_to: 0,
            priority: 2,
            fin: false,
            unidirectional: false,
            headers: Headers::from([("streamtype", "stdout"), ("x-multi", "a"), ("x-multi", "b")]),
        },
        Frame::Data {
            stream_id: 3,
            fin: false,
            data: b"hello\n".to_vec(),
        },
        Frame::Data {
            stream_id: 3,
            fin: true,
            data: Vec::new(),
        },
        Frame::Ping { id: 7 },
        Frame::WindowUpdate {
            stream_id: 5,
            delta: 1024,
        },
        Frame::RstStream {
            stream_id: 1,
            status: rst::CANCEL,
        },
        Frame::GoAway {
            last_good_stream_id: 5,
            status: 0,
        },
    ]
}

fn decode_all(codec: &mut Codec, mut bytes: Vec<u8>) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = codec.decode(&mut bytes).unwrap() {
        frames.push(f);
    }
    assert!(bytes.is_empty(), "{} bytes left over", bytes.len());
    frames
}

fn encode_all(codec: &mut Codec, frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        codec.encode(f, &mut out).unwrap();
    }
    out
}

#[test]
fn every_frame_survives_a_round_trip_on_one_compression_stream() {
    let mut more = session();
    more.push(Frame::SynReply {
        stream_id: 2,
        fin: true,
        headers: Headers::from([("status", "200")]),
    });
    more.push(Frame::Headers {
        stream_id: 5,
        fin: false,
        headers: Headers::from([("streamtype", "resize")]),
    });
    more.push(Frame::Settings {
        clear: true,
        entries: vec![],
    });
    let bytes = encode_all(&mut Codec::new(), &more);
    assert_eq!(decode_all(&mut Codec::new(), bytes), more);
}

#[test]
fn a_frame_arriving_a_byte_at_a_time_decodes_once_whole() {
    let bytes = encode_all(&mut Codec::new(), &session());
    let mut reader = Codec::new();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    for b in bytes {
        buf.push(b);
        if let Some(f) = reader.decode(&mut buf).unwrap() {
            frames.push(f);
        }
    }
    assert_eq!(frames, session());
}

#[test]
fn frames_written_by_kubernetes_spdy_framer_decode() {
    // Written by `go run . write` in tests/go (github.com/moby/spdystream v0.5.1).
    let bytes =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/from-go.bin")).unwrap();
    // Go keeps header names in canonical case (`Streamtype`) and writes them lowercased.
    assert_eq!(decode_all(&mut Codec::new(), bytes), session());
}

#[test]
fn frames_this_codec_writes_are_read_by_kubernetes_spdy_framer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go");
    let bytes = encode_all(&mut Codec::new(), &session());
    let input = tempfile_with(&bytes);
    let out = Command::new("go")
        .args(["run", ".", "read"])
        .current_dir(&dir)
        .env("GOFLAGS", "-mod=mod")
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .expect("go is installed (scripts/setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SETTINGS [{0 7 65536}]\n\
         SYN_STREAM 1 fin=false streamtype=error\n\
         SYN_STREAM 3 fin=false streamtype=stdin\n\
         SYN_STREAM 5 fin=false streamtype=stdout;x-multi=a,b\n\
         DATA 3 fin=false \"hello\\n\"\n\
         DATA 3 fin=true \"\"\n\
         PING 7\n\
         WINDOW_UPDATE 5 1024\n\
         RST_STREAM 1 5\n\
         GOAWAY 5 0\n"
    );
    let _ = std::fs::remove_file(input);
}

fn tempfile_with(bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("fleetlet-spdy-{}.bin", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_frame_over_the_limit_is_refused_before_its_body_arrives() {
    let mut header = vec![0x80, 0x03, 0x00, 0x01, 0x00];
    header.extend(&(2u32 << 20).to_be_bytes()[1..]);
    let err = Codec::new().decode(&mut header).unwrap_err();
    assert_eq!(
        err,
        Error::FrameTooLarge {
            length: 2 << 20,
            limit: 1 << 20
        }
    );
}

#[test]
fn a_header_block_that_inflates_past_the_limit_is_refused() {
    // 1 MiB of one repeated byte compresses to about a kilobyte.
    let big = "a".repeat(1 << 20);
    let frame = Frame::SynStream {
        stream_id: 1,
        associated_to: 0,
        priority: 0,
        fin: false,
        unidirectional: false,
        headers: Headers::from([("x-bomb", big.as_str())]),
    };
    let mut writer = Codec::with_limits(1 << 20, 2 << 20);
    let mut bytes = Vec::new();
    writer.encode(&frame, &mut bytes).unwrap();
    assert!(bytes.len() < 16 << 10, "{} bytes", bytes.len());
    let err = Codec::new().decode(&mut bytes).unwrap_err();
    assert!(
        matches!(err, Error::HeaderBlock(ref m) if m.contains("limit")),
        "{err}"
    );
}

#[test]
fn malformed_frames_are_typed_errors_and_unknown_types_are_ignored() {
    let control = |version: u8, frame_type: u8, flags: u8, body: &[u8]| {
        let mut b = vec![0x80, version, 0x00, frame_type, flags];
        b.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        b.extend(body);
        b
    };
    let decode = |mut b: Vec<u8>| Codec::new().decode(&mut b);
    assert_eq!(
        decode(control(2, 6, 0, &[0, 0, 0, 1])),
        Err(Error::UnsupportedVersion(2))
    );
    assert!(matches!(
        decode(control(3, 3, 0, &[0, 0, 0, 1])),
        Err(Error::Invalid {
            frame: "RST_STREAM",
            ..
        })
    ));
    assert!(matches!(
        decode(control(3, 3, 0, &[0, 0, 0, 0, 0, 0, 0, 5])),
        Err(Error::Invalid { frame: "RST_STREAM", ref reason }) if reason.contains("stream id 0")
    ));
    assert!(matches!(
        decode(control(3, 4, 0, &[0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 1])),
        Err(Error::Invalid {
            frame: "SETTINGS",
            ..
        })
    ));
    assert!(matches!(
        decode(control(3, 9, 0, &[0, 0, 0, 1, 0, 0, 0, 0])),
        Err(Error::Invalid {
            frame: "WINDOW_UPDATE",
            ..
        })
    ));
    assert!(matches!(
        decode(control(
            3,
            1,
            0,
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad]
        )),
        Err(Error::HeaderBlock(_))
    ));
    assert_eq!(
        decode(control(3, 10, 0, &[1, 2, 3])),
        Ok(Some(Frame::Unknown { frame_type: 10 }))
    );
}
