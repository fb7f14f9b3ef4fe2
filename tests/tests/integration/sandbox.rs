//! The broker sandboxes itself: started as root, it splits into a privileged helper and a
//! serving process that runs as the service user with no capability, `no_new_privs`, a
//! seccomp filter on every thread and Landlock — checked here in `/proc` of the real
//! processes, and by forbidden system calls made inside them (the `fault` driver's test-only
//! methods), which fail with `EPERM`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use portcullis_client::OpenMode;
use portcullis_tests::{Broker, BrokerSetup, NOBODY};

/// `/proc/<pid>/status` as a map.
fn status(pid: u32) -> BTreeMap<String, String> {
    status_at(&format!("/proc/{pid}/status"))
}

fn status_at(path: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn uids(status: &BTreeMap<String, String>) -> Vec<u32> {
    status["Uid"].split_whitespace().map(|u| u.parse().unwrap()).collect()
}

/// The helper: the serving process's one child.
fn helper_of(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let children: Vec<u32> = children.split_whitespace().map(|c| c.parse().unwrap()).collect();
    assert_eq!(
        children.len(),
        1,
        "the serving process has one child, the helper: {children:?}"
    );
    children[0]
}

fn service_uid() -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", "portcullis"])
        .output()
        .unwrap();
    assert!(out.status.success(), "`cargo xtask test` makes the portcullis user");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// CAP_DAC_OVERRIDE (1), CAP_NET_ADMIN (12), CAP_SYS_PTRACE (19).
const HELPER_CAPS: u64 = (1 << 1) | (1 << 12) | (1 << 19);

#[test]
fn the_serving_process_holds_nothing_and_the_helper_three_capabilities() {
    let broker = Broker::start();
    let serving = status(broker.pid());
    let uid = service_uid();
    assert_eq!(uids(&serving), vec![uid; 4], "{serving:?}");
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(serving[set], "0000000000000000", "{set}");
    }
    assert_eq!(serving["NoNewPrivs"], "1");
    assert_eq!(serving["Seccomp"], "2");
    assert_eq!(serving["Groups"], "");
    // Every thread is filtered; the runtime's threads have their own filter on top.
    let mut workers = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", broker.pid())).unwrap() {
        let task = task.unwrap().path();
        let thread = status_at(&task.join("status").display().to_string());
        let filters: u32 = thread["Seccomp_filters"].parse().unwrap();
        assert!(filters >= 1, "{task:?} has no filter");
        if thread["Name"].starts_with("tokio-rt") {
            workers += 1;
            assert!(filters >= 2, "a runtime thread without the worker filter: {thread:?}");
        }
    }
    assert!(workers > 0);
    let helper = status(helper_of(broker.pid()));
    assert_eq!(uids(&helper), vec![0; 4]);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&helper[set], 16).unwrap(),
            HELPER_CAPS,
            "helper {set}"
        );
    }
    assert_eq!(helper["CapAmb"], "0000000000000000");
    assert_eq!(helper["NoNewPrivs"], "1");
    assert_eq!(helper["Seccomp"], "2");
    // `portcullis stats` says the same of both.
    let stats = broker.stats();
    let sandbox = stats["sandbox"].as_array().unwrap();
    assert_eq!(sandbox.len(), 2, "{stats}");
    assert_eq!(sandbox[0]["role"], "serving");
    assert_eq!(sandbox[0]["uids"][1], uid);
    assert_eq!(sandbox[0]["cap_effective"], "0000000000000000");
    assert_eq!(sandbox[0]["seccomp"], 2);
    assert_eq!(sandbox[0]["landlock"], "enforced");
    assert_eq!(sandbox[1]["role"], "helper");
    assert_eq!(sandbox[1]["pid"], helper_of(broker.pid()));
    assert_eq!(sandbox[1]["cap_effective"], format!("{HELPER_CAPS:016x}"));
    assert_eq!(sandbox[1]["no_new_privs"], true);
    // The run dir it made is the service user's (who removes the sockets at the end); the
    // sockets were bound before the split, by root.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(broker.run_dir()).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(broker.socket()).unwrap().uid(), 0);
}

const FAULT_CONFIG: &str = "[[device]]\nname = \"fault0\"\ndriver = \"fault\"\n";
const ALLOW_ALL: &str = "[[principal]]\nname = \"all\"\n\n[[rule]]\nid = \"all\"\neffect = \"allow\"\nprincipals = [\"all\"]\nmethods = [\"*\"]\n";

/// `execve`, `ptrace`, `mount` and `socket(AF_INET)` made on a runtime thread of the serving
/// process, and by the helper, fail with `EPERM`; both carry on serving.
#[tokio::test(flavor = "multi_thread")]
async fn forbidden_system_calls_fail_with_eperm_in_both_processes() {
    let broker = Broker::with(BrokerSetup {
        config: Some(FAULT_CONFIG),
        policy: Some(ALLOW_ALL),
        ..BrokerSetup::default()
    });
    let (session, fault) = broker.open("fault0", OpenMode::Shared).await;
    for (call, name) in ["execve", "ptrace", "mount", "socket(AF_INET)"].iter().enumerate() {
        for method in ["forbidden", "helper_forbidden"] {
            let out = session.call_named(&fault, method, &[call as u64], &[]).await.unwrap();
            assert_eq!(out.scalars, vec![libc::EPERM as u64], "{method} {name}");
        }
    }
    assert_eq!(
        session.call_named(&fault, "ok", &[], &[]).await.unwrap().scalars,
        vec![1]
    );
    let helper = helper_of(broker.pid());
    assert!(Path::new(&format!("/proc/{helper}")).exists());
}

/// Waits until process `pid` has exited (its pidfd becomes readable), at most `bound`.
fn wait_gone(pid: u32, bound: Duration) {
    let Ok(pidfd) = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    ) else {
        return;
    };
    let timeout = rustix::event::Timespec {
        tv_sec: bound.as_secs() as i64,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(
        &mut [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)],
        Some(&timeout),
    )
    .unwrap();
    assert_eq!(ready, 1, "process {pid} still runs after {bound:?}");
}

#[test]
fn the_helper_and_the_serving_process_die_together() {
    use rustix::process::{Pid, Signal, kill_process};
    // The helper killed: the serving process stops.
    let mut broker = Broker::start();
    let helper = helper_of(broker.pid());
    kill_process(Pid::from_raw(helper as i32).unwrap(), Signal::KILL).unwrap();
    let status = broker.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success() || broker.log().contains("the privileged helper exited"),
        "{status}"
    );
    assert!(
        broker.log().contains("the privileged helper exited"),
        "{}",
        broker.log()
    );
    // The serving process killed: the helper goes with it.
    let broker = Broker::start();
    let helper = helper_of(broker.pid());
    broker.signal(Signal::KILL);
    wait_gone(helper, Duration::from_secs(10));
}

/// A broker started by another user has no helper, says what that costs, and still confines
/// itself: no capability, `no_new_privs`, seccomp.
#[test]
fn a_broker_not_started_as_root_runs_without_the_helper_and_says_what_it_loses() {
    let broker = Broker::with(BrokerSetup {
        run_as: Some(NOBODY),
        ..BrokerSetup::default()
    });
    let serving = status(broker.pid());
    assert_eq!(uids(&serving), vec![NOBODY; 4]);
    assert_eq!(serving["CapEff"], "0000000000000000");
    assert_eq!(serving["NoNewPrivs"], "1");
    assert_eq!(serving["Seccomp"], "2");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", broker.pid())).unwrap();
    assert!(children.trim().is_empty(), "no helper: {children}");
    let log = broker.log();
    assert_eq!(
        log.matches("not started as root: no privileged helper").count(),
        1,
        "{log}"
    );
    assert!(log.contains("exe, exe_sha256"), "{log}");
    let stats = broker.stats();
    assert_eq!(stats["sandbox"].as_array().unwrap().len(), 1, "{stats}");
}

/// `[sandbox] enabled = false` serves as the starting user, and says so.
#[test]
fn the_sandbox_turned_off_is_said_loudly() {
    let broker = Broker::with(BrokerSetup {
        config: Some("[sandbox]\nenabled = false\n\n[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n"),
        ..BrokerSetup::default()
    });
    let serving = status(broker.pid());
    assert_eq!(uids(&serving), vec![0; 4]);
    assert_eq!(serving["Seccomp"], "0");
    assert!(broker.log().contains("the sandbox is off"));
}
