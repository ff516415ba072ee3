//! The `kumo` binary as a shell runs it: completions, closed pipes, and
//! what it says when no kumo controller answers.

use std::process::{Command, Output, Stdio};

fn kumo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kumo"));
    // No saved credentials from the machine running the tests.
    cmd.env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("KUMO_URL")
        .env_remove("KUMO_TOKEN");
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bash_completes_subcommands_and_flags() {
    let script = kumo().args(["completions", "bash"]).output().unwrap();
    assert!(script.status.success(), "{}", stderr(&script));
    // Complete `kumo vm cr` and `kumo vm create --mem` the way bash does.
    let complete = |words: &str| {
        let shell = format!(
            "source /dev/stdin; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _kumo kumo \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\""
        );
        let mut child = Command::new("bash")
            .args(["-c", &shell])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&script.stdout)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(complete("kumo vm cr"), "create");
    assert_eq!(complete("kumo vm create --mem"), "--memory");
}

#[test]
fn completions_exist_for_zsh_and_fish() {
    for (shell, marker) in [("zsh", "#compdef kumo"), ("fish", "complete -c kumo")] {
        let out = kumo().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script:.200}");
    }
    let out = kumo().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("possible values: bash"));
}

#[test]
fn a_closed_pipe_ends_kumo_quietly() {
    // The reading end is closed before kumo starts, so its first write
    // fails with EPIPE (`kumo completions bash | head -1` once head left).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = kumo()
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(stderr(&out), "");
    assert!(out.status.success(), "{:?}", out.status);
}

#[test]
fn a_url_where_no_kumo_answers_is_named_with_a_hint() {
    let url = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = kumo()
        .args(["host", "list"])
        .env("KUMO_URL", &url)
        .env("KUMO_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "error: no kumo controller answers at {url}: connection refused (is kumod running \
             there? `kumo login URL --token-file FILE` or KUMO_URL changes the URL)\n"
        )
    );
}
