//! Property tests: every message round-trips through framing, and the decoders never panic
//! on random, truncated or oversized input.

use kiln_proto::*;
use proptest::prelude::*;

fn s() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..600)
}

fn kind() -> impl Strategy<Value = FileKind> {
    prop_oneof![
        Just(FileKind::File),
        Just(FileKind::Dir),
        Just(FileKind::Symlink),
        Just(FileKind::Other)
    ]
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::NotFound),
        Just(ErrorKind::PermissionDenied),
        Just(ErrorKind::AlreadyExists),
        Just(ErrorKind::InvalidRequest),
        Just(ErrorKind::TooLarge),
        Just(ErrorKind::ExecFailed),
        Just(ErrorKind::Timeout),
        Just(ErrorKind::Io),
        Just(ErrorKind::Unsupported),
        Just(ErrorKind::Malformed),
        Just(ErrorKind::NotADirectory),
        Just(ErrorKind::IsADirectory),
        Just(ErrorKind::DirectoryNotEmpty),
    ]
}

fn stdin() -> impl Strategy<Value = Stdin> {
    prop_oneof![
        Just(Stdin::Null),
        Just(Stdin::Stream),
        bytes().prop_map(Stdin::Bytes)
    ]
}

fn exec_req() -> impl Strategy<Value = ExecRequest> {
    (
        prop::collection::vec(s(), 0..5),
        prop::collection::vec((s(), s()), 0..4),
        prop::option::of(s()),
        stdin(),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u64>()),
        any::<bool>(),
        (
            prop::option::of(s()),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(argv, env, cwd, stdin, timeout_ms, output_cap, background, (user, mem, pids))| {
                ExecRequest {
                    argv,
                    env,
                    cwd,
                    stdin,
                    timeout_ms,
                    output_cap,
                    background,
                    user,
                    limits: ExecLimits {
                        memory_max: mem,
                        pids_max: pids,
                    },
                }
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        exec_req().prop_map(Request::Exec),
        (any::<u64>(), bytes()).prop_map(|(exec_id, data)| Request::StdinData { exec_id, data }),
        any::<u64>().prop_map(|exec_id| Request::StdinEof { exec_id }),
        (any::<u64>(), any::<i32>())
            .prop_map(|(exec_id, signal)| Request::Signal { exec_id, signal }),
        any::<u64>().prop_map(|exec_id| Request::Wait { exec_id }),
        (s(), any::<u64>(), any::<u64>()).prop_map(|(path, offset, len)| Request::ReadFile {
            path,
            offset,
            len
        }),
        (
            s(),
            any::<u64>(),
            bytes(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(any::<u32>())
        )
            .prop_map(
                |(path, offset, data, create, truncate, mode)| Request::WriteFile {
                    path,
                    offset,
                    data,
                    create,
                    truncate,
                    mode
                }
            ),
        (s(), any::<u64>()).prop_map(|(path, start)| Request::ListDir { path, start }),
        s().prop_map(|path| Request::Stat { path }),
        (s(), any::<bool>(), prop::option::of(any::<u32>())).prop_map(|(path, parents, mode)| {
            Request::Mkdir {
                path,
                parents,
                mode,
            }
        }),
        (s(), any::<bool>()).prop_map(|(path, recursive)| Request::Remove { path, recursive }),
        (s(), s()).prop_map(|(from, to)| Request::Rename { from, to }),
        s().prop_map(|path| Request::Exists { path }),
        (any::<u64>(), bytes())
            .prop_map(|(unix_time_ns, seed)| Request::PostRestore { unix_time_ns, seed }),
        Just(Request::Shutdown),
    ]
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    (
        prop::option::of(any::<i32>()),
        prop::option::of(any::<i32>()),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(code, signal, timed_out, truncated, oom_killed, pids_limit_hit)| ExitStatus {
                code,
                signal,
                timed_out,
                truncated,
                oom_killed,
                pids_limit_hit,
            },
        )
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Pong),
        Just(Response::Ok),
        (any::<u64>(), any::<u32>())
            .prop_map(|(exec_id, pid)| Response::ExecStarted { exec_id, pid }),
        bytes().prop_map(Response::Stdout),
        bytes().prop_map(Response::Stderr),
        exit_status().prop_map(Response::Exit),
        (bytes(), any::<bool>()).prop_map(|(data, eof)| Response::Data { data, eof }),
        any::<u64>().prop_map(|len| Response::Written { len }),
        (
            prop::collection::vec(
                (s(), kind(), any::<u64>()).prop_map(|(name, kind, size)| DirEntry {
                    name,
                    kind,
                    size
                }),
                0..5
            ),
            any::<bool>()
        )
            .prop_map(|(entries, more)| Response::DirEntries { entries, more }),
        (kind(), any::<u64>(), any::<u32>(), any::<i64>()).prop_map(
            |(kind, size, mode, mtime_ns)| Response::Stat(FileStat {
                kind,
                size,
                mode,
                mtime_ns
            })
        ),
        any::<bool>().prop_map(Response::Bool),
        (error_kind(), s()).prop_map(|(kind, message)| Response::Error { kind, message }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            prop::collection::vec(s(), 0..4),
            any::<bool>(),
            s(),
            any::<u32>()
        )
            .prop_map(
                |(capabilities, restored, agent_version, version)| Message::Hello(Hello {
                    version,
                    capabilities,
                    restored,
                    agent_version
                })
            ),
        (any::<u64>(), request()).prop_map(|(id, body)| Message::Request { id, body }),
        (any::<u64>(), response()).prop_map(|(id, body)| Message::Response { id, body }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = encode_frame(&msg).unwrap();
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        prop_assert_eq!(len, frame.len() - 4);
        // Blocking reader.
        let back = read_frame(&mut frame.as_slice()).unwrap();
        prop_assert_eq!(&back, &msg);
        // Incremental decoder, fed in two pieces.
        let mut d = FrameDecoder::new();
        let cut = frame.len() / 2;
        d.feed(&frame[..cut]);
        if cut < frame.len() {
            prop_assert!(d.next_message().unwrap().is_none() || cut >= frame.len());
        }
        d.feed(&frame[cut..]);
        prop_assert_eq!(d.next_message().unwrap(), Some(msg));
        prop_assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn truncated_frames_are_errors_not_panics(msg in message(), cut in any::<prop::sample::Index>()) {
        let frame = encode_frame(&msg).unwrap();
        let cut = cut.index(frame.len()); // strictly shorter than the frame
        let r = read_frame(&mut &frame[..cut]);
        prop_assert!(r.is_err());
        // Truncating the payload itself must not decode into the same message.
        if cut > 4 {
            if let Ok(m) = decode_payload(&frame[4..cut]) {
                prop_assert_ne!(m, msg);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_payload(&data);
        let mut r = data.as_slice();
        for _ in 0..8 {
            if read_frame(&mut r).is_err() { break; }
        }
        let mut d = FrameDecoder::new();
        for chunk in data.chunks(7) {
            d.feed(chunk);
            loop {
                match d.next_message() {
                    Ok(Some(m)) => { let _ = m.validate(); }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => break,
                    Err(_) => {}
                }
            }
        }
        prop_assert!(d.buffered() <= MAX_FRAME + FRAME_HEADER_LEN + 7);
    }

    #[test]
    fn oversized_lengths_rejected(len in (MAX_FRAME as u32 + 1)..=u32::MAX, tail in bytes()) {
        let mut data = len.to_le_bytes().to_vec();
        data.extend_from_slice(&tail);
        let is_too_large = matches!(
            read_frame(&mut data.as_slice()),
            Err(ProtoError::FrameTooLarge { .. })
        );
        prop_assert!(is_too_large);
        let mut d = FrameDecoder::new();
        d.feed(&data);
        let is_too_large = matches!(d.next_message(), Err(ProtoError::FrameTooLarge { .. }));
        prop_assert!(is_too_large);
    }
}

#[test]
fn limits_are_enforced_by_validate() {
    let mut e = ExecRequest::new(["true"]);
    e.argv = vec!["x".into(); MAX_ARGS + 1];
    let err = Request::Exec(e).validate().unwrap_err();
    assert_eq!(err.what, "Exec.argv");
    let r = Request::WriteFile {
        path: "/a".into(),
        offset: 0,
        data: vec![0; MAX_CHUNK + 1],
        create: true,
        truncate: true,
        mode: None,
    };
    assert_eq!(r.validate().unwrap_err().what, "WriteFile.data");
    let r = Request::Stat {
        path: "a".repeat(MAX_PATH + 1),
    };
    assert!(r.validate().is_err());
    let ok = Request::Exec(ExecRequest::new(["echo", "hi"]));
    ok.validate().unwrap();
    // A maximal legal data message still fits in one frame.
    let m = Message::Request {
        id: u64::MAX,
        body: Request::WriteFile {
            path: "p".repeat(MAX_PATH),
            offset: u64::MAX,
            data: vec![0xff; MAX_CHUNK],
            create: true,
            truncate: true,
            mode: Some(u32::MAX),
        },
    };
    m.validate().unwrap();
    encode_frame(&m).unwrap();
}
