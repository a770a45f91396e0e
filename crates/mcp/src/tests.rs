//! Unit tests without a VM: argument parsing and validation, result encoding, and a real MCP
//! session (rmcp over an in-memory pipe, raw JSON-RPC on the client side) listing the tools
//! and getting tool errors for bad ids and arguments.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::ToolError;
use crate::state::{McpConfig, Sandboxes};
use crate::tools::*;

fn registry() -> Sandboxes {
    Sandboxes::new(McpConfig {
        default_image: Some("python".into()),
        memory_mib: 256,
        ..McpConfig::default()
    })
}

#[test]
fn arguments_parse_with_defaults() {
    let a: RunCommandArgs =
        serde_json::from_value(json!({"sandbox_id": "sb-1", "command": "echo hi"})).unwrap();
    assert_eq!(a.sandbox_id, "sb-1");
    assert_eq!(a.command, "echo hi");
    assert!(a.env.is_empty() && a.cwd.is_none() && a.timeout_secs.is_none());
    let a: RunCommandArgs = serde_json::from_value(json!({
        "sandbox_id": "sb-1", "command": "env", "cwd": "/tmp",
        "env": {"A": "1"}, "timeout_secs": 5
    }))
    .unwrap();
    assert_eq!(a.env.get("A").map(String::as_str), Some("1"));
    let j = command_job(a).unwrap();
    assert_eq!(j.argv, ["/bin/sh", "-c", "env"]);
    assert_eq!(j.timeout, Duration::from_secs(5));
    assert_eq!(j.opts.cwd.as_deref(), Some("/tmp"));

    let r: ReadFileArgs =
        serde_json::from_value(json!({"sandbox_id": "sb-1", "path": "/a"})).unwrap();
    assert_eq!(r.encoding, Encoding::Utf8);
    let w: WriteFileArgs = serde_json::from_value(
        json!({"sandbox_id": "sb-1", "path": "/a", "content": "aGk=", "encoding": "base64"}),
    )
    .unwrap();
    assert_eq!(decode_content(w.content, w.encoding).unwrap(), b"hi");
    let c: CreateArgs = serde_json::from_value(json!({})).unwrap();
    assert_eq!(c, CreateArgs::default());
}

#[test]
fn malformed_arguments_are_rejected() {
    // Missing, unknown and mistyped fields fail deserialization (rmcp: invalid_params).
    for bad in [
        json!({"command": "echo"}),
        json!({"sandbox_id": "sb-1", "command": "x", "bogus": 1}),
        json!({"sandbox_id": "sb-1", "command": 3}),
        json!({"sandbox_id": "sb-1", "command": "x", "timeout_secs": -1}),
    ] {
        assert!(
            serde_json::from_value::<RunCommandArgs>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    assert!(serde_json::from_value::<ReadFileArgs>(
        json!({"sandbox_id": "sb-1", "path": "/a", "encoding": "latin1"})
    )
    .is_err());
}

fn invalid_field(e: ToolError) -> &'static str {
    match e {
        ToolError::InvalidArgument { field, .. } => field,
        other => panic!("not InvalidArgument: {other:?}"),
    }
}

#[test]
fn out_of_range_arguments_are_tool_errors_naming_the_field() {
    let cmd = |command: &str, cwd: Option<&str>, t: Option<u64>| RunCommandArgs {
        sandbox_id: "sb-1".into(),
        command: command.into(),
        cwd: cwd.map(Into::into),
        env: BTreeMap::new(),
        timeout_secs: t,
    };
    assert_eq!(
        invalid_field(command_job(cmd("  ", None, None)).unwrap_err()),
        "command"
    );
    assert_eq!(
        invalid_field(command_job(cmd("true", Some("tmp"), None)).unwrap_err()),
        "cwd"
    );
    assert_eq!(
        invalid_field(command_job(cmd("true", None, Some(0))).unwrap_err()),
        "timeout_secs"
    );
    assert_eq!(
        invalid_field(command_job(cmd("true", None, Some(3601))).unwrap_err()),
        "timeout_secs"
    );
    let mut a = cmd("true", None, None);
    a.env.insert("A=B".into(), "1".into());
    assert_eq!(invalid_field(command_job(a).unwrap_err()), "env");
    assert_eq!(
        invalid_field(command_job(cmd(&"x".repeat(MAX_COMMAND + 1), None, None)).unwrap_err()),
        "command"
    );

    let r = registry();
    let spec = create_spec(CreateArgs::default(), &r).unwrap();
    assert_eq!(spec.image.as_deref(), Some("python"));
    assert_eq!(spec.memory_mib, 256);
    let bad = |c: CreateArgs| invalid_field(create_spec(c, &r).unwrap_err());
    assert_eq!(
        bad(CreateArgs {
            memory_mib: Some(64),
            ..CreateArgs::default()
        }),
        "memory_mib"
    );
    assert_eq!(
        bad(CreateArgs {
            image: Some("".into()),
            ..CreateArgs::default()
        }),
        "image"
    );
    assert_eq!(
        bad(CreateArgs {
            timeout_secs: Some(100_000),
            ..CreateArgs::default()
        }),
        "timeout_secs"
    );
    assert_eq!(
        invalid_field(decode_content("***".into(), Encoding::Base64).unwrap_err()),
        "content"
    );
    assert_eq!(invalid_field(path_arg("path", "rel").unwrap_err()), "path");
}

#[test]
fn python_runs_from_stdin() {
    let j = python_job(RunPythonArgs {
        sandbox_id: "sb-1".into(),
        code: "print(6*7)".into(),
        ..RunPythonArgs::default()
    })
    .unwrap();
    assert_eq!(j.argv, ["python3", "-"]);
    assert!(matches!(&j.opts.stdin, kiln::StdinSource::Bytes(b) if b == b"print(6*7)"));
    assert_eq!(j.timeout, DEFAULT_COMMAND_TIMEOUT);
}

#[test]
fn content_encoding_falls_back_to_base64() {
    assert_eq!(
        encode_content(b"hi\n".to_vec(), Encoding::Utf8),
        (Encoding::Utf8, "hi\n".to_string())
    );
    assert_eq!(
        encode_content(vec![0xff, 0, 1], Encoding::Utf8),
        (Encoding::Base64, "/wAB".to_string())
    );
    assert_eq!(
        encode_content(b"hi".to_vec(), Encoding::Base64),
        (Encoding::Base64, "aGk=".to_string())
    );
}

#[test]
fn exec_summaries_carry_code_and_streams() {
    let mut o = ExecOutput {
        sandbox_id: "sb-1".into(),
        exit_code: Some(3),
        signal: None,
        timed_out: false,
        truncated: false,
        stdout: "out\n".into(),
        stderr: "err\n".into(),
        duration_ms: 5,
    };
    let s = exec_summary(&o, Duration::from_secs(60));
    assert_eq!(s, "exit code 3\n--- stdout ---\nout\n--- stderr ---\nerr\n");
    o.timed_out = true;
    o.exit_code = None;
    o.signal = Some(9);
    o.stderr.clear();
    let s = exec_summary(&o, Duration::from_secs(2));
    assert!(s.starts_with("timed out after 2s"), "{s}");
    assert!(!s.contains("stderr"), "{s}");
}

/// A raw JSON-RPC client on one end of a pipe, the real handler on the other.
struct Session {
    w: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    r: BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    next: u64,
}

impl Session {
    async fn start() -> Session {
        let (client, server) = tokio::io::duplex(1 << 20);
        let handler = KilnMcp::new(Arc::new(registry()));
        tokio::spawn(async move {
            if let Ok(running) = handler.serve(server).await {
                let _ = running.waiting().await;
            }
        });
        let (r, w) = tokio::io::split(client);
        let mut s = Session {
            w,
            r: BufReader::new(r),
            next: 1,
        };
        let init = s
            .call(
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "unit", "version": "1"}}),
            )
            .await;
        assert_eq!(init["result"]["serverInfo"]["name"], "kiln-mcp", "{init}");
        s.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        s
    }

    async fn send(&mut self, v: Value) {
        let mut line = v.to_string();
        line.push('\n');
        self.w.write_all(line.as_bytes()).await.unwrap();
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
                .await
                .expect("no answer within 10 s")
                .unwrap();
            assert!(n > 0, "the server closed the pipe");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["id"] == json!(id) {
                return v;
            }
        }
    }

    async fn tool(&mut self, name: &str, args: Value) -> Value {
        self.call("tools/call", json!({"name": name, "arguments": args}))
            .await
    }
}

fn tool_error_text(v: &Value) -> String {
    assert_eq!(v["result"]["isError"], json!(true), "not a tool error: {v}");
    v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lists_the_tools_and_maps_errors() {
    let mut s = Session::start().await;
    let list = s.call("tools/list", json!({})).await;
    let tools = list["result"]["tools"].as_array().unwrap();
    let mut names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "create_sandbox",
            "kill_sandbox",
            "list_files",
            "list_sandboxes",
            "read_file",
            "run_command",
            "run_python",
            "write_file"
        ]
    );
    let run = tools.iter().find(|t| t["name"] == "run_command").unwrap();
    let required = run["inputSchema"]["required"].as_array().unwrap();
    assert!(required.contains(&json!("sandbox_id")) && required.contains(&json!("command")));
    let out = &run["outputSchema"]["properties"];
    for f in ["stdout", "stderr", "exit_code"] {
        assert!(out.get(f).is_some(), "outputSchema lacks {f}: {run}");
    }

    let r = s
        .tool(
            "run_command",
            json!({"sandbox_id": "sb-9", "command": "true"}),
        )
        .await;
    let t = tool_error_text(&r);
    assert!(t.contains("unknown sandbox id \"sb-9\""), "{t}");
    let r = s.tool("kill_sandbox", json!({"sandbox_id": "nope"})).await;
    assert!(tool_error_text(&r).contains("unknown sandbox id \"nope\""));
    let r = s
        .tool(
            "read_file",
            json!({"sandbox_id": "sb-1", "path": "relative"}),
        )
        .await;
    assert!(tool_error_text(&r).contains("invalid argument path"));
    let r = s.tool("create_sandbox", json!({"memory_mib": 1})).await;
    assert!(tool_error_text(&r).contains("invalid argument memory_mib"));
    // Malformed arguments are tool errors too (rmcp's), before any tool runs.
    let r = s.tool("run_command", json!({"command": "true"})).await;
    assert!(
        tool_error_text(&r).contains("missing field `sandbox_id`"),
        "{r}"
    );

    let r = s.tool("list_sandboxes", json!({})).await;
    assert_eq!(r["result"]["isError"], json!(false), "{r}");
    assert_eq!(
        r["result"]["structuredContent"],
        json!({"sandboxes": [], "max_sandboxes": 4})
    );
    assert!(r["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .starts_with("0 live sandboxes"));
}
