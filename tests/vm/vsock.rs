//! The VMM's vsock device in both directions, driven at the level of `agentos-vmm`: the guest
//! agent dials the host (`vsock.sock_1024`), a host client dials the guest (`CONNECT 52`), both
//! carry the agentos protocol, and a shutdown ends the VMM cleanly; its jail's root is built
//! under `--chroot-base` and removed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentos_core::agent::connection::{AgentConnection, ExecIo};
use agentos_core::agent::vm::AGENT_CMDLINE;
use agentos_image::{self as image, AGENT_IMAGE};
use agentos_protocol::{AGENT_CONTROL_PORT, AGENT_LISTEN_PORT, ExecRequest, Program};

use crate::common::{Scratch, share_machine, vm_available};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Once the guest is up, every answer must come within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

fn accept_within(listener: &UnixListener, deadline: Instant) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the guest agent never dialled the host"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn exec_echo(conn: &mut AgentConnection, word: &str) -> String {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let request = ExecRequest {
        run: Program::new("/bin/echo").with_args([word]),
        ..Default::default()
    };
    let status = conn
        .exec(
            request,
            ExecIo {
                stdin: None,
                stdout: &mut out,
                stderr: &mut err,
            },
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    String::from_utf8(out).unwrap()
}

#[test]
fn both_vsock_directions_carry_the_protocol_and_shutdown_is_clean() {
    if !vm_available() {
        return;
    }
    let _machine = share_machine();
    let img = image::find_image(&image::default_cache_dir(), AGENT_IMAGE)
        .expect("no agent image: run scripts/setup");
    let t = Scratch::new("vsock");
    let run = t.run_dir();
    std::fs::create_dir_all(&run).unwrap();
    // The VMM's own directory, as agentos makes one: its user's (the default, 65534), 0700.
    let own = run.join("vmm");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
    // As the daemon does: a socket the jailed VMM (another uid) may connect to.
    let control =
        agentos_core::rundir::listen(&own.join(format!("vsock.sock_{AGENT_CONTROL_PORT}")))
            .unwrap();
    let report_path = run.join("report.json");
    // The jail's root goes under a base of our choosing, in a directory named after the VMM's
    // supervisor, which removes it at the end.
    let jails = t.dir.join("jails");
    let mut vmm = t
        .vmm()
        .arg("--kernel")
        .arg(img.boot_kernel())
        .arg("--initrd")
        .arg(&img.initrd)
        .args(["--memory", "256", "--cmdline", AGENT_CMDLINE])
        .arg("--vsock-uds")
        .arg(own.join("vsock.sock"))
        .arg("--report")
        .arg(&report_path)
        .arg("--chroot-base")
        .arg(&jails)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let jail_root = jails.join(vmm.id().to_string());
    let deadline = Instant::now() + BOOT_TIMEOUT;

    // Guest to host: the agent dials port 1024.
    let stream = accept_within(&control, deadline);
    let mut dialled = AgentConnection::handshake(stream, BOOT_TIMEOUT).unwrap();
    dialled.set_deadline(Some(Instant::now() + ANSWER_TIMEOUT));
    assert_eq!(exec_echo(&mut dialled, "one"), "one\n");
    assert!(
        jail_root.is_dir(),
        "no jail root at {}",
        jail_root.display()
    );

    // Host to guest: CONNECT to the agent's listening port, through the VMM's socket.
    let mut stream = UnixStream::connect(own.join("vsock.sock")).unwrap();
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    writeln!(stream, "CONNECT {AGENT_LISTEN_PORT}").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader
        .read_line(&mut ok)
        .expect("no answer to CONNECT from the VMM");
    assert!(
        ok.starts_with("OK ") && ok.ends_with('\n'),
        "answer to CONNECT: {ok:?}"
    );
    drop(reader);
    let mut opened = AgentConnection::handshake(stream, ANSWER_TIMEOUT).unwrap();
    opened.set_deadline(Some(Instant::now() + ANSWER_TIMEOUT));
    assert_eq!(exec_echo(&mut opened, "two"), "two\n");
    assert!(opened.ping().unwrap() < Duration::from_secs(10));

    // A port nobody listens on in the guest is refused: the client sees the socket close.
    let mut refused = UnixStream::connect(own.join("vsock.sock")).unwrap();
    refused.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    writeln!(refused, "CONNECT 4000").unwrap();
    let mut answer = String::new();
    BufReader::new(refused)
        .read_line(&mut answer)
        .expect("the refused connection was neither answered nor closed");
    assert_eq!(
        answer, "",
        "a connection to a closed guest port must be refused"
    );

    dialled.shutdown().unwrap();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let status = loop {
        if let Some(status) = vmm.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit after the shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        !jail_root.exists(),
        "the jail root {} was left behind",
        jail_root.display()
    );
    std::fs::remove_dir(&jails).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["outcome"], "shutdown", "{report}");
    let vsock = &report["metrics"]["vsock"];
    assert_eq!(vsock["tx_bad_chains"], 0, "{report}");
    assert_eq!(vsock["credit_violations"], 0, "{report}");
    assert!(
        vsock["connections_opened"].as_u64().unwrap() >= 2,
        "{report}"
    );
    drop(control);
    std::fs::remove_file(own.join(format!("vsock.sock_{AGENT_CONTROL_PORT}"))).unwrap();
    std::fs::remove_dir(&own).unwrap();
    std::fs::remove_file(&report_path).unwrap();
    t.assert_nothing_left();
}
