//! The `loopback-floor` binary end to end: its relay runs in a child process.

use std::process::Command;

fn loopback_floor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loopback-floor"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn two_hops_through_the_relay_process_report_every_message() {
    let output = loopback_floor(&["--rate", "20000", "--seconds", "0.05", "--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.starts_with("{\"received\":1000,"), "{stdout}");
    assert!(stdout.contains("\"p999\":"), "{stdout}");
}

#[test]
fn one_hop_prints_a_line_of_percentiles() {
    let output = loopback_floor(&["--hops", "1", "--rate", "20000", "--seconds", "0.05"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.starts_with("1 hop(s), 20000 msgs/s, 1000 messages of 100 B: p50 "),
        "{stdout}"
    );
}

#[test]
fn bad_settings_exit_non_zero_with_the_reason() {
    for (args, reason) in [
        (&["--hops", "3"][..], "--hops must be 1"),
        (
            &["--seconds", "0"][..],
            "--seconds must be a positive number, got 0",
        ),
        (&["--size", "8"][..], "--size must be between 16"),
        (&["--rate", "0"][..], "--rate must be a positive number"),
    ] {
        let output = loopback_floor(args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}
