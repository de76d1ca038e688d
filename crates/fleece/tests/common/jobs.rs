//! Driving push-backup jobs through the CLI: start one, wait for a state
//! or its end.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

use super::{text, wait_for, Daemon};

/// How long a test waits for a job's state before it fails.
const PATIENCE: Duration = Duration::from_secs(120);

/// Starts a job (`fleece backup start ARGS`) and returns its name.
pub fn start(d: &Daemon, args: &[&str]) -> String {
    let mut a = vec!["backup", "start"];
    a.extend_from_slice(args);
    d.cli_ok(&a).trim().to_string()
}

/// `backup start` that must fail; its stderr.
pub fn start_fails(d: &Daemon, args: &[&str]) -> String {
    let mut a = vec!["backup", "start"];
    a.extend_from_slice(args);
    let out = d.cli(&a);
    assert!(!out.status.success(), "fleece {a:?} succeeded");
    text(&out.stderr)
}

/// Polls a job until `pred` holds; its JSON then.
pub fn wait_job_for(d: &Daemon, job: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let held = wait_for(PATIENCE, || {
        last = d.json(&["backup", "show", job]);
        pred(&last)
    });
    assert!(held, "job {job}: waited for {what}: {last}\n{}", d.log());
    last
}

/// Polls a job until it ends; its last JSON.
pub fn wait_job(d: &Daemon, job: &str) -> Value {
    wait_job_for(d, job, "its end", |j| {
        ["completed", "failed", "cancelled"].contains(&j["state"].as_str().unwrap())
    })
}

/// Starts a job, waits for it, asserts it completed.
pub fn backup(d: &Daemon, args: &[&str]) -> Value {
    let name = start(d, args);
    let j = wait_job(d, &name);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    j
}
