//! The carrier's PCI test device (`agentos carrier --pci-test-device`, which `scripts/test` gives
//! this module's carrier): the IOMMU is on, QEMU's `edu` device sits in an IOMMU group of its
//! own, and `agentos doctor` says what passing it to an agent needs, before and after it is
//! bound to vfio-pci.

use std::path::Path;
use std::process::Output;

use agentos::carrier::{
    PCI_TEST_DEVICE_IDS, PCI_TEST_DISPLAY_IDS, PCI_TEST_MSIX_IDS, PCI_TEST_WIDE_BAR_IDS,
    TEST_ROM_MARKER,
};
use agentos::pci;

use crate::common::{Scratch, describe, vmm_process};
use crate::daemon::Daemon;

/// `agentos doctor --json`'s findings by name, and its PCI devices.
fn doctor(scratch: &Scratch) -> (serde_json::Value, Vec<serde_json::Value>) {
    let out = scratch.output(&["doctor", "--json"], b"");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", describe(&out)));
    let findings = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["what"].as_str().unwrap().to_owned(), f.clone()))
        .collect::<serde_json::Map<_, _>>();
    let devices = doc["pci_devices"].as_array().unwrap().clone();
    (serde_json::Value::Object(findings), devices)
}

fn test_device(devices: &[serde_json::Value]) -> serde_json::Value {
    let (vendor, device) = PCI_TEST_DEVICE_IDS;
    devices
        .iter()
        .find(|d| d["vendor"] == vendor && d["device"] == device)
        .unwrap_or_else(|| {
            panic!(
                "no {vendor:04x}:{device:04x} device: this module runs in a carrier started with --pci-test-device (scripts/test does); devices: {devices:?}"
            )
        })
        .clone()
}

#[test]
fn doctor_shows_the_test_device_and_what_it_needs_until_bound_to_vfio() {
    let scratch = Scratch::new("vfio-doctor");
    let (findings, devices) = doctor(&scratch);
    assert!(
        findings["iommu"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("on: "),
        "{findings}"
    );
    let mut edu = test_device(&devices);
    let group = edu["iommu_group"].as_u64().expect("edu has an IOMMU group");
    let members: Vec<_> = devices
        .iter()
        .filter(|d| d["iommu_group"] == group)
        .map(|d| d["address"].clone())
        .collect();
    assert_eq!(members, [edu["address"].clone()], "edu's group is its own");
    let address = edu["address"].as_str().unwrap().to_owned();
    assert!(pci::is_address(&address), "{address}");

    // Whatever an earlier test left: unbound first, so that both states are checked.
    let was_bound = !edu["driver"].is_null();
    if was_bound {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", &address).unwrap();
        let (_, devices) = doctor(&scratch);
        edu = test_device(&devices);
    }
    assert!(edu["driver"].is_null(), "{edu}");
    assert_eq!(edu["ready"], false, "{edu}");
    let problem = edu["problem"].as_str().unwrap();
    assert!(
        problem.contains("not bound to vfio-pci")
            && problem.contains("echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id"),
        "{problem}"
    );
    // What the problem says to do (once the id is known to vfio-pci, `bind` does the same).
    if was_bound {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/bind", &address).unwrap();
    } else {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/new_id", "1234 11e8")
            .expect("binding edu to vfio-pci");
    }

    let (findings, devices) = doctor(&scratch);
    let edu = test_device(&devices);
    assert_eq!(edu["driver"], pci::VFIO_DRIVER, "{edu}");
    assert_eq!(edu["ready"], true, "{edu}");
    assert!(edu.get("problem").is_none(), "{edu}");
    let vfio = findings["vfio"]["detail"].as_str().unwrap();
    assert!(vfio.contains(&format!("{address} (ready)")), "{vfio}");
    let node = format!("/dev/vfio/{group}");
    assert!(Path::new(&node).exists(), "{node} after binding");
    let text = scratch.output(&["doctor"], b"");
    assert!(
        describe(&text).contains(&format!(
            "{address} 1234:11e8 class 00ff00 group {group}: ready"
        )),
        "{}",
        describe(&text)
    );
}

/// The test device's address, bound to vfio-pci.
fn bound_test_device(scratch: &Scratch) -> String {
    let (_, devices) = doctor(scratch);
    let edu = test_device(&devices);
    if edu["driver"].is_null() {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/new_id", "1234 11e8")
            .expect("binding edu to vfio-pci");
    }
    edu["address"].as_str().unwrap().to_owned()
}

/// Where every guest script starts: `$dev`, edu's directory on the guest's PCI bus.
const FIND_EDU: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = 0x1234:0x11e8 ] && dev=$d
done
"#;

/// Runs `script` (after [`FIND_EDU`]) in an agent given the test device, `extra` flags before
/// the program; returns the output and its account for assertion messages.
fn run_with_edu(
    scratch: &Scratch,
    address: &str,
    extra: &[&str],
    script: &str,
) -> (Output, String) {
    let device = format!("vfio:{address}");
    let script = format!("{FIND_EDU}{script}");
    let mut args = vec!["run", "--device", device.as_str()];
    args.extend_from_slice(extra);
    args.extend(["--", "/bin/sh", "-c", script.as_str()]);
    let out = scratch.output(&args, b"");
    let text = describe(&out);
    (out, text)
}

/// Finds edu on the guest's PCI bus and uses its registers at BAR0: the id, the liveness
/// register (which returns the complement of what was written) and the factorial unit.
const EDU_IN_THE_GUEST: &str = r#"
[ -n "$dev" ] || { echo "no edu among: $(ls /sys/bus/pci/devices)"; exit 3; }
bar=$(head -n 1 $dev/resource | cut -d' ' -f1)
echo "bar0=$bar"
echo "id=$(busybox devmem $bar 32)"
busybox devmem $((bar + 4)) 32 0x12345678
echo "live=$(busybox devmem $((bar + 4)) 32)"
busybox devmem $((bar + 8)) 32 10
n=0
while [ $(( $(busybox devmem $((bar + 0x20)) 32) & 1 )) -ne 0 ] && [ $n -lt 1000 ]; do n=$((n + 1)); done
echo "fact=$(busybox devmem $((bar + 8)) 32)"
"#;

#[test]
fn an_agent_uses_the_test_device_through_its_own_pci_bus() {
    let scratch = Scratch::new("vfio-run");
    let address = bound_test_device(&scratch);
    let (out, text) = run_with_edu(&scratch, &address, &[], EDU_IN_THE_GUEST);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("id=0x010000ED"), "{text}");
    assert!(stdout.contains("live=0xEDCBA987"), "{text}");
    // 10! = 3628800
    assert!(stdout.contains("fact=0x00375F00"), "{text}");
    scratch.assert_nothing_left();
}

#[test]
fn devices_an_agent_cannot_have_are_refused_in_one_line() {
    let scratch = Scratch::new("vfio-refused");
    let address = bound_test_device(&scratch);
    let refused = |device: &str| {
        let out = scratch.output(&["run", "--device", device, "--", "/bin/true"], b"");
        assert!(!out.status.success(), "{device}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(stderr.trim().lines().count(), 1, "{device}: {stderr}");
        stderr
    };
    assert!(refused("vfio:0000:00:1f.7").contains("no such PCI device"));
    // One VM at a time: a second asking for the device while the first has it is refused.
    let mut first = scratch.spawn(&[
        "run",
        "--device",
        &format!("vfio:{address}"),
        "--",
        "/bin/sh",
        "-c",
        "echo up; sleep 600",
    ]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "up\n");
    let busy = refused(&format!("vfio:{address}"));
    assert!(busy.contains("in use by another VM"), "{busy}");
    // SAFETY: a signal to our own child, which has not been waited for.
    unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGTERM) };
    first.wait().unwrap();
    assert!(refused("0000:00:01.0").contains("give a device as vfio:ADDRESS"));
    // Unbound from vfio-pci, the device is refused with what to do; bound again, it works.
    std::fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", &address).unwrap();
    let unbound = refused(&format!("vfio:{address}"));
    std::fs::write("/sys/bus/pci/drivers/vfio-pci/bind", &address).unwrap();
    assert!(
        unbound.contains("not bound to vfio-pci") && unbound.contains("new_id"),
        "{unbound}"
    );
    scratch.assert_nothing_left();
}

/// A guest page the agent's kernel leaves alone (`memmap=4K$0x7000000` on its command line),
/// below edu's 28-bit DMA limit, which the guest reaches through /dev/mem.
const DMA_PAGE: &str = "0x7000000";
const RESERVE_DMA_PAGE: &str = "memmap=4K$0x7000000";

/// Turns on edu's bus mastering (command register: memory space and bus master), has it copy
/// 8 bytes from guest RAM into its own buffer (its DMA address 0x40000, not readable through
/// the BAR), and back from its buffer to another place in guest RAM: both ways through the
/// IOMMU, at guest-physical addresses.
const EDU_DMA_IN_THE_GUEST: &str = r#"
bar=$(( $(head -n 1 $dev/resource | cut -d' ' -f1) ))
page=$(( PAGE ))
dma() { # source, destination, count, command
  busybox devmem $((bar + 0x80)) 64 $1
  busybox devmem $((bar + 0x88)) 64 $2
  busybox devmem $((bar + 0x90)) 64 $3
  busybox devmem $((bar + 0x98)) 64 $4
  n=0
  while [ $(( $(busybox devmem $((bar + 0x98)) 64) & 1 )) -ne 0 ] && [ $n -lt 1000 ]; do n=$((n + 1)); done
}
printf '\006\000' | dd of=$dev/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null
echo "command=$(dd if=$dev/config bs=1 skip=4 count=2 2>/dev/null | od -An -tx2 | tr -d ' ')"
busybox devmem $page 32 0x11223344
busybox devmem $((page + 4)) 32 0x55667788
busybox devmem $((page + 0x100)) 64 0
dma $page 0x40000 8 1
dma 0x40000 $((page + 0x100)) 8 3
echo "back=$(busybox devmem $((page + 0x100)) 32),$(busybox devmem $((page + 0x104)) 32)"
"#;

#[test]
fn the_test_device_reads_and_writes_guest_memory_by_dma() {
    let scratch = Scratch::new("vfio-dma");
    let address = bound_test_device(&scratch);
    let script = EDU_DMA_IN_THE_GUEST.replace("PAGE", DMA_PAGE);
    let (out, text) = run_with_edu(
        &scratch,
        &address,
        &["--kernel-args", RESERVE_DMA_PAGE],
        &script,
    );
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("command=0006"), "{text}");
    assert!(stdout.contains("back=0x11223344,0x55667788"), "{text}");
    scratch.assert_nothing_left();
}

/// Binds edu to the guest's generic userspace I/O driver, has edu raise its interrupt (0x60),
/// and waits for it: a read of /dev/uio0 returns the number of interrupts once one came. Then
/// acknowledges it (0x64).
const EDU_INTERRUPT_IN_THE_GUEST: &str = r#"
bar=$(( $(head -n 1 $dev/resource | cut -d' ' -f1) ))
echo 1234 11e8 > /sys/bus/pci/drivers/uio_pci_generic/new_id
[ -e /dev/uio0 ] || { echo "no /dev/uio0"; exit 3; }
dd if=/dev/uio0 of=/tmp/irqs bs=4 count=1 2>/dev/null &
waiter=$!
sleep 1
busybox devmem $((bar + 0x60)) 32 1
n=0
while kill -0 $waiter 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
busybox devmem $((bar + 0x64)) 32 1
echo "interrupts=$(od -An -tu4 /tmp/irqs | tr -d ' ')"
"#;

#[test]
fn the_test_devices_interrupt_reaches_the_guest() {
    let scratch = Scratch::new("vfio-intx");
    let address = bound_test_device(&scratch);
    let (out, text) = run_with_edu(&scratch, &address, &[], EDU_INTERRUPT_IN_THE_GUEST);
    assert!(out.status.success(), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("interrupts=1\n"),
        "{text}"
    );
    scratch.assert_nothing_left();
}

/// Programs edu's MSI capability by hand (no driver in the guest): bus mastering on, the
/// message to local APIC 0 with vector 0xe0, which no guest driver owns, MSI on; then has edu
/// raise its interrupt. The guest kernel logs the vector it had no handler for.
const EDU_MSI_IN_THE_GUEST: &str = r#"
bar=$(( $(head -n 1 $dev/resource | cut -d' ' -f1) ))
put() { printf "$1" | dd of=$dev/config bs=1 seek=$2 conv=notrunc 2>/dev/null; }
cap=$(od -An -tu1 -j 52 -N 1 $dev/config | tr -d ' ')
[ "$(od -An -tu1 -j $cap -N 1 $dev/config | tr -d ' ')" = 5 ] || { echo "no MSI capability"; exit 3; }
control=$(od -An -tu2 -j $((cap + 2)) -N 2 $dev/config | tr -d ' ')
put '\006\000' 4
put '\000\000\340\376' $((cap + 4))
if [ $((control & 0x80)) -ne 0 ]; then
  put '\000\000\000\000' $((cap + 8)); data=$((cap + 12))
else
  data=$((cap + 8))
fi
put '\340\000' $data
put '\001' $((cap + 2))
busybox devmem $((bar + 0x60)) 32 1
sleep 1
busybox devmem $((bar + 0x64)) 32 1
dmesg | grep "No irq handler for vector"
"#;

#[test]
fn the_test_devices_msi_reaches_the_vector_the_guest_chose() {
    let scratch = Scratch::new("vfio-msi");
    let address = bound_test_device(&scratch);
    let (out, text) = run_with_edu(&scratch, &address, &[], EDU_MSI_IN_THE_GUEST);
    assert!(out.status.success(), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0.224 No irq handler for vector"),
        "{text}"
    );
    scratch.assert_nothing_left();
}

#[test]
fn a_vm_killed_during_dma_leaves_the_device_to_the_next() {
    let scratch = Scratch::new("vfio-killed");
    let address = bound_test_device(&scratch);
    let device = format!("vfio:{address}");
    // The first agent copies into guest RAM over and over, saying so once it has started.
    let looping = format!("{FIND_EDU}{EDU_DMA_IN_THE_GUEST}")
        .replace("PAGE", DMA_PAGE)
        .replace(
        "dma 0x40000 $((page + 0x100)) 8 3\n",
        "dma 0x40000 $((page + 0x100)) 8 3\necho copying\nwhile :; do dma 0x40000 $((page + 0x200)) 8 3; done\n",
    );
    assert!(looping.contains("while :"), "the loop is in the script");
    let mut first = scratch.spawn(&[
        "run",
        "--device",
        &device,
        "--kernel-args",
        RESERVE_DMA_PAGE,
        "--",
        "/bin/sh",
        "-c",
        &looping,
    ]);
    let mut stdout = std::io::BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    while line != "copying\n" {
        line.clear();
        let read = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(read > 0, "the first agent ended before copying");
    }
    let vmm = vmm_process(&scratch.run_dir().display().to_string()).expect("the first VMM");
    // SAFETY: a signal to a process of this test's run directory.
    unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) };
    let status = first.wait().unwrap();
    assert!(!status.success(), "the first agent's VM was killed");

    let (out, text) = run_with_edu(
        &scratch,
        &address,
        &["--kernel-args", RESERVE_DMA_PAGE],
        &EDU_DMA_IN_THE_GUEST.replace("PAGE", DMA_PAGE),
    );
    assert!(out.status.success(), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("back=0x11223344,0x55667788"),
        "{text}"
    );
    scratch.assert_nothing_left();
}

#[test]
fn the_benchmark_times_the_device_in_agents_beside_the_host() {
    let scratch = Scratch::new("vfio-bench");
    let address = bound_test_device(&scratch);
    let out = scratch.output(
        &[
            "bench",
            "vfio",
            "--json",
            "--read-batches",
            "2",
            "--dma",
            "1",
            "--interrupts",
            "3",
        ],
        b"",
    );
    let text = describe(&out);
    assert!(out.status.success(), "{text}");
    let bench: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&text);
    assert_eq!(bench["device"], address.as_str(), "{bench}");
    // The mapped BAR's reads never reach the VMM; with mmap=off each of the guest's 200 timed
    // reads (and its check of the id register) does.
    assert_eq!(bench["trapped_bar_accesses"]["vm_mapped"], 0, "{bench}");
    assert!(
        bench["trapped_bar_accesses"]["vm_trapped"]
            .as_u64()
            .unwrap()
            >= 201,
        "{bench}"
    );
    for reads in ["host_mapped", "host_vfio_read", "vm_mapped", "vm_trapped"] {
        assert!(
            bench["register_read_ns"][reads]["median"].as_f64().unwrap() > 0.0,
            "{reads}: {bench}"
        );
    }
    for side in ["host", "vm"] {
        assert!(
            bench["dma_round_trip_ms"][side]["median"].as_f64().unwrap() > 0.0,
            "{bench}"
        );
        assert!(
            bench["interrupt_us"][side]["p50"].as_f64().unwrap() > 0.0,
            "{bench}"
        );
    }
    for ratio in [
        "read_mapped",
        "read_trapped",
        "read_trapped_vs_mapped",
        "dma",
        "interrupt_p50",
    ] {
        assert!(
            bench["ratios"][ratio].as_f64().unwrap() > 0.0,
            "{ratio}: {bench}"
        );
    }
    scratch.assert_nothing_left();
}

/// The id register of edu, read in a daemon's agent.
const READ_EDU_ID: &str = "bar=$(head -n 1 $dev/resource | cut -d' ' -f1); busybox devmem $bar 32";

#[test]
fn the_daemon_gives_a_device_to_one_agent_at_a_time() {
    let scratch = Scratch::new("vfio-daemon");
    let address = bound_test_device(&scratch);
    let device = format!("vfio:{address}");
    let d = Daemon::start(&scratch);
    d.ok(&["spawn", "--name", "a", "--device", &device]);
    assert_eq!(d.agent("a")["devices"], serde_json::json!([address]));
    let script = format!("{FIND_EDU}{READ_EDU_ID}");
    let id = d.ok(&["exec", "a", "--", "/bin/sh", "-c", &script]);
    assert_eq!(id.trim(), "0x010000ED");
    let ps = d.ok(&["ps"]);
    assert!(ps.contains(&format!("devices: {address}")), "{ps}");

    // Held by `a`: refused to another agent, a group member included, before any boot.
    d.refused(
        &["spawn", "--name", "b", "--device", &device],
        &format!("{address}: in use by agent `a`; `agentos rm a` frees it"),
    );
    let group = scratch.dir.join("edu.toml");
    std::fs::write(
        &group,
        format!(
            "name = \"edu\"\nchannels = [\"input -> user\", \"user -> output\"]\n\n[[agent]]\nname = \"user\"\nexec = [\"/bin/cat\"]\ndevices = [\"{device}\"]\n"
        ),
    )
    .unwrap();
    let group = group.to_str().unwrap();
    d.refused(&["group", "up", group], "agent `edu/user`: ");
    d.refused(&["group", "up", group], "in use by agent `a`");
    let snapshots = scratch.dir.join("snap");
    std::fs::create_dir(&snapshots).unwrap();
    d.refused(
        &["snapshot", "a", "--to", snapshots.to_str().unwrap()],
        "a VM with a passed-through device cannot be saved",
    );

    // Freed by `rm`, it goes to the next: the group's member.
    d.ok(&["rm", "--force", "a"]);
    d.ok(&["group", "up", group]);
    assert_eq!(d.agent("edu/user")["devices"], serde_json::json!([address]));
    let id = d.ok(&["exec", "edu/user", "--", "/bin/sh", "-c", &script]);
    assert_eq!(id.trim(), "0x010000ED");
    d.ok(&["group", "down", "edu"]);
    d.signal_and_wait(libc::SIGTERM);
    scratch.assert_nothing_left();
}

/// The address of the carrier's test device with these ids, bound to vfio-pci.
fn bound_device(scratch: &Scratch, (vendor, device): (u16, u16)) -> String {
    let (_, devices) = doctor(scratch);
    let found = devices
        .iter()
        .find(|d| d["vendor"] == vendor && d["device"] == device)
        .unwrap_or_else(|| panic!("no {vendor:04x}:{device:04x} device among {devices:?}"));
    if found["driver"].is_null() {
        std::fs::write(
            "/sys/bus/pci/drivers/vfio-pci/new_id",
            format!("{vendor:04x} {device:04x}"),
        )
        .expect("binding the device to vfio-pci");
    }
    found["address"].as_str().unwrap().to_owned()
}

#[test]
fn gpus_are_display_devices_bound_to_vfio_one_agent_each() {
    let scratch = Scratch::new("vfio-gpu");
    let address = bound_device(&scratch, PCI_TEST_DISPLAY_IDS);
    // The agent finds a display-class device on its bus, and reads its expansion ROM (the
    // VBIOS a GPU driver reads) through its sysfs.
    let out = scratch.output(
        &[
            "run",
            "--gpu",
            "1",
            "--",
            "/bin/sh",
            "-c",
            "cat /sys/bus/pci/devices/*/class; for d in /sys/bus/pci/devices/*; do [ -e $d/rom ] && echo 1 > $d/rom && dd if=$d/rom bs=4096 count=1 2>/dev/null; done",
        ],
        b"",
    );
    let text = describe(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|c| c.starts_with("0x03")), "{text}");
    assert!(stdout.contains(TEST_ROM_MARKER), "{text}");
    let d = Daemon::start(&scratch);
    d.ok(&["spawn", "--name", "g1", "--gpu", "1"]);
    assert_eq!(d.agent("g1")["devices"], serde_json::json!([address]));
    d.refused(
        &["spawn", "--name", "g2", "--gpu", "1"],
        "1 GPU(s) asked for; this host has 1 ready to pass",
    );
    d.refused(&["spawn", "--name", "g2", "--gpu", "1"], "1 of them in use");
    d.ok(&["rm", "--force", "g1"]);
    d.ok(&["spawn", "--name", "g2", "--gpu", "1"]);
    d.signal_and_wait(libc::SIGTERM);
    scratch.assert_nothing_left();
}

/// Finds the device with the 64-bit BAR (ivshmem) and its BAR 2, the device's memory.
const FIND_WIDE_BAR: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1110 ] && dev=$d
done
[ -n "$dev" ] || { echo "no ivshmem among: $(ls /sys/bus/pci/devices)"; exit 3; }
set -- $(sed -n 3p $dev/resource)
echo "bar2=$1-$2"
"#;

#[test]
fn a_64_bit_bar_gets_the_window_above_4_gib_and_is_the_devices_memory() {
    let scratch = Scratch::new("vfio-wide");
    let address = bound_device(&scratch, PCI_TEST_WIDE_BAR_IDS);
    let device = format!("vfio:{address}");
    let run = |script: &str| {
        let script = format!("{FIND_WIDE_BAR}{script}");
        let out = scratch.output(
            &["run", "--device", &device, "--", "/bin/sh", "-c", &script],
            b"",
        );
        let text = describe(&out);
        assert!(out.status.success(), "{text}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), text)
    };
    // 512 MiB does not fit the 256 MiB window below 4 GiB: it is at 128 GiB, whole.
    let (stdout, text) = run("busybox devmem $(($1 + 0x1000)) 32 0x5eed1234");
    assert!(
        stdout.contains("bar2=0x0000002000000000-0x000000201fffffff"),
        "{text}"
    );
    // The next VM reads what the first wrote: the BAR is the device's memory, not the VMM's.
    let (stdout, text) = run("echo \"read=$(busybox devmem $(($1 + 0x1000)) 32)\"");
    assert!(stdout.contains("read=0x5EED1234"), "{text}");
    scratch.assert_nothing_left();
}

/// Programs two MSI-X vectors of the igb function by hand (no driver in the guest): entry 0 to
/// vector 0xe2, entry 1 to 0xe1, through the table the VMM emulates; turns MSI-X on; then has
/// igb raise vector 1 (its extended interrupt cause set register, in MSI-X mode), vector 1
/// again while its entry is masked, then unmasks it, then raises vector 0. The guest kernel
/// logs each vector it had no handler for; `count V` counts them.
const IGB_MSIX_IN_THE_GUEST: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = 0x8086:0x10c9 ] && dev=$d
done
[ -n "$dev" ] || { echo "no igb among: $(ls /sys/bus/pci/devices)"; exit 3; }
byte() { od -An -tu1 -j $1 -N 1 $dev/config | tr -d ' '; }
put() { printf "$1" | dd of=$dev/config bs=1 seek=$2 conv=notrunc 2>/dev/null; }
cap=$(byte 52)
while [ "$cap" != 0 ] && [ "$(byte $cap)" != 17 ]; do cap=$(byte $((cap + 1))); done
[ "$cap" != 0 ] || { echo "no MSI-X capability"; exit 3; }
table=$(od -An -tu4 -j $((cap + 4)) -N 4 $dev/config | tr -d ' ')
t=$(( $(sed -n "$(( (table & 7) + 1 ))p" $dev/resource | cut -d' ' -f1) + (table & ~7) ))
reg=$(( $(head -n 1 $dev/resource | cut -d' ' -f1) ))
count() { dmesg | grep -c "0.$1 No irq handler for vector"; }
raise() { busybox devmem $((reg + 0x1580)) 32 $1; busybox devmem $((reg + 0x1520)) 32 $1; sleep 1; }
put '\006\000' 4
entry() { # index, vector, control
  busybox devmem $((t + $1 * 16)) 32 0xfee00000
  busybox devmem $((t + $1 * 16 + 4)) 32 0
  busybox devmem $((t + $1 * 16 + 8)) 32 $2
  busybox devmem $((t + $1 * 16 + 12)) 32 $3
}
entry 0 0xe2 0
entry 1 0xe1 0
echo "entry1=$(busybox devmem $((t + 24)) 32)"
put "\\$(printf %o $(( $(byte $((cap + 3))) | 0x80 )))" $((cap + 3))
echo "enabled=$(( $(byte $((cap + 3))) >> 7 ))"
busybox devmem $((reg + 0x1514)) 32 0x10
busybox devmem $((reg + 0x1524)) 32 0x3
raise 0x2
echo "first=$(count 225),$(count 226)"
busybox devmem $((t + 28)) 32 1
raise 0x2
echo "masked=$(count 225)"
busybox devmem $((t + 28)) 32 0
sleep 1
echo "unmasked=$(count 225)"
raise 0x1
echo "other=$(count 226)"
"#;

#[test]
fn msix_vectors_reach_the_vectors_the_guest_chose_and_wait_while_masked() {
    let scratch = Scratch::new("vfio-msix");
    let address = bound_device(&scratch, PCI_TEST_MSIX_IDS);
    let device = format!("vfio:{address}");
    let out = scratch.output(
        &[
            "run",
            "--device",
            &device,
            "--",
            "/bin/sh",
            "-c",
            IGB_MSIX_IN_THE_GUEST,
        ],
        b"",
    );
    let text = describe(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "entry1=0x000000E1",
        "enabled=1",
        // Vector 1 reached 0xe1 (225), not entry 0's 0xe2.
        "first=1,0",
        // Masked, its interrupt waited; unmasked, it came.
        "masked=1",
        "unmasked=2",
        "other=1",
    ] {
        assert!(stdout.contains(expected), "{expected}: {text}");
    }
    scratch.assert_nothing_left();
}

#[test]
fn the_test_device_copies_between_a_programs_locked_pages_by_dma() {
    let scratch = Scratch::new("vfio-pagemap");
    let address = bound_test_device(&scratch);
    // The guest agent's `edu` tool locks two pages of its own, finds their guest-physical
    // addresses in /proc/self/pagemap, has edu copy 4 KiB of a pattern from one into its buffer
    // and from there into the other (zeroed first), and fails unless they then match.
    let (out, text) = run_with_edu(
        &scratch,
        &address,
        &[],
        "/init edu --read-batches 1 --dma 2 --dma-locked",
    );
    assert!(out.status.success(), "{text}");
    let times: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&text);
    assert_eq!(
        times["dma_round_trip_us"].as_array().map(Vec::len),
        Some(2),
        "{text}"
    );
    scratch.assert_nothing_left();
}

#[test]
fn a_device_whose_iommu_group_has_a_sibling_bound_elsewhere_is_refused_in_one_line() {
    let scratch = Scratch::new("vfio-group");
    let first = bound_test_device(&scratch);
    // The second edu sits behind a PCI bridge, in one group with a virtio device the carrier's
    // virtio-pci driver has.
    let (_, devices) = doctor(&scratch);
    let (vendor, device) = PCI_TEST_DEVICE_IDS;
    let second = devices
        .iter()
        .find(|d| d["vendor"] == vendor && d["device"] == device && d["address"] != first.as_str())
        .unwrap_or_else(|| panic!("no second edu among {devices:?}"))
        .clone();
    let address = second["address"].as_str().unwrap();
    if second["driver"].is_null() {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/bind", address).unwrap();
    }
    let sibling = devices
        .iter()
        .find(|d| d["iommu_group"] == second["iommu_group"] && d["driver"] == "virtio-pci")
        .unwrap_or_else(|| panic!("no sibling bound to virtio-pci among {devices:?}"));
    let out = scratch.output(
        &[
            "run",
            "--device",
            &format!("vfio:{address}"),
            "--",
            "/bin/true",
        ],
        b"",
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{address}: its IOMMU group is not viable: {} in the same group is bound to virtio-pci",
            sibling["address"].as_str().unwrap()
        )),
        "{stderr}"
    );
    scratch.assert_nothing_left();
}
