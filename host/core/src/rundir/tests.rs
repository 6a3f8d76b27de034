use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn labels_are_read_back_by_directory_name() {
    let dir = RunDir::create("t").unwrap();
    let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(label_of(&name), None);
    dir.set_label("digest/summarizer\n").unwrap();
    assert_eq!(label_of(&name).as_deref(), Some("digest/summarizer"));
    dir.set_label("again").unwrap();
    assert_eq!(label_of(&name).as_deref(), Some("again"));
    assert_eq!(label_of("../etc"), None);
}

#[test]
fn run_dirs_are_private_unique_and_removed() {
    let a = RunDir::create("t").unwrap();
    let b = RunDir::create("t").unwrap();
    assert_ne!(a.path(), b.path());
    let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let base = std::fs::metadata(a.path().parent().unwrap()).unwrap();
    assert_eq!(base.permissions().mode() & 0o777, 0o700);
    let path = a.path().to_path_buf();
    a.create_file("f").unwrap();
    drop(a);
    assert!(!path.exists());
}

#[test]
fn a_base_that_is_a_symlink_or_open_to_others_is_refused() {
    let t = scratch();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = Base::open(&link, true).err().unwrap();
    assert!(err.to_string().contains("is a symbolic link"), "{err}");
    assert!(err.to_string().contains(RUN_DIR_ENV), "{err}");

    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = Base::open(&real, true).err().unwrap();
    assert!(err.to_string().contains("has mode 755"), "{err}");

    let file = t.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = Base::open(&file, true).err().unwrap();
    assert!(err.to_string().contains("is not a directory"), "{err}");

    // Made fresh: one mkdir, mode 0700 whatever the umask.
    let fresh = t.path().join("fresh");
    Base::open(&fresh, true).unwrap();
    let meta = std::fs::metadata(&fresh).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_base_another_user_made_first_is_refused() {
    if !crate::testing::is_root("chown a directory to another user") {
        return;
    }
    let t = scratch();
    let theirs = t.path().join("agentos-0");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = Base::open(&theirs, true).err().unwrap();
    assert!(
        err.to_string()
            .contains("belongs to user 65534, not to you"),
        "{err}"
    );
    // Nothing was written into it.
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}

#[test]
fn files_are_never_written_or_read_through_symlinks() {
    let dir = RunDir::create("t").unwrap();
    let t = scratch();
    let target = t.path().join("target");
    std::fs::write(&target, "precious").unwrap();
    // A planted `label` symlink is replaced, never written through.
    std::os::unix::fs::symlink(&target, dir.join("label")).unwrap();
    dir.set_label("a/b").unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(
        !std::fs::symlink_metadata(dir.join("label"))
            .unwrap()
            .is_symlink()
    );
    // create_file refuses a name that exists, symlink or not.
    std::os::unix::fs::symlink(&target, dir.join("vmm.log")).unwrap();
    assert!(dir.create_file("vmm.log").is_err());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    // read_file refuses a symlink and a FIFO (which would block a plain read).
    std::os::unix::fs::symlink(&target, dir.join("report.json")).unwrap();
    assert!(dir.read_file("report.json", 1024).is_err());
    let fifo = CString::new(dir.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(dir.read_file("fifo", 1024).is_err());
    // Reads are bounded.
    dir.create_file("big").unwrap();
    std::fs::write(dir.join("big"), vec![b'x'; 4096]).unwrap();
    assert_eq!(dir.read_file("big", 100).unwrap().len(), 100);
}

#[test]
fn sockets_get_their_mode_from_a_umask_of_their_own() {
    let dir = RunDir::create("t").unwrap();
    let vmm = dir.vmm_dir(false).unwrap();
    let _a = vmm.listen("vsock.sock_1024").unwrap();
    let mode = std::fs::metadata(vmm.join("vsock.sock_1024"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    let private = dir.join("api.sock");
    let _b = listen_private(&private).unwrap();
    assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o600);
    // The process's own umask is untouched.
    // SAFETY: umask reads and sets this thread's mask; set back at once.
    let mask = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(mask) };
    assert_ne!(mask, VMM_SOCKET_UMASK);
    // What the VMM left at a name is replaced: a symlink is removed, not followed.
    let t = scratch();
    let target = t.path().join("target");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, vmm.join("vsock.sock_1025")).unwrap();
    let _c = vmm.listen("vsock.sock_1025").unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert!(vmm.listen("../escape").is_err());
}

#[test]
fn each_jailed_vmm_gets_a_user_of_its_own() {
    if !crate::testing::is_root("give a directory to another user") {
        return;
    }
    let a = RunDir::create("t").unwrap();
    let b = RunDir::create("t").unwrap();
    let (va, vb) = (a.vmm_dir(true).unwrap(), b.vmm_dir(true).unwrap());
    let (ia, ib) = (va.id().unwrap(), vb.id().unwrap());
    assert_ne!(ia, ib);
    let (first, last) = vmm_ids().unwrap();
    for (dir, id) in [(&va, ia), (&vb, ib)] {
        assert!((first..=last).contains(&id));
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (id, id));
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }
    // A directory made by a VMM that ended frees its id.
    drop(va);
    drop(a);
    let c = RunDir::create("t").unwrap();
    let vc = c.vmm_dir(true).unwrap();
    assert_ne!(vc.id(), Some(ib));
}

#[test]
fn id_ranges_are_checked() {
    assert_eq!(parse_id_range("100-200"), Some((100, 200)));
    assert_eq!(parse_id_range(" 5 - 5 "), Some((5, 5)));
    for bad in ["0-10", "10-5", "1-4294967295", "x-1", "7", ""] {
        assert_eq!(parse_id_range(bad), None, "{bad}");
    }
}

#[test]
fn a_lock_held_elsewhere_times_out_instead_of_blocking() {
    let t = scratch();
    let path = t.path().join("lock");
    let held = File::create(&path).unwrap();
    let _lock = lock_with_timeout(held, Duration::from_secs(1)).unwrap();
    let other = File::open(&path).unwrap();
    let started = Instant::now();
    assert!(matches!(
        lock_with_timeout(other, Duration::from_millis(200)),
        Err(LockError::TimedOut)
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}
