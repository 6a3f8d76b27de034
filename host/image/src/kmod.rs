//! Kernel modules: which `.ko` files a wanted set needs, in the order the guest must load them.
//!
//! Debian's kernel package ships no `modules.dep` (`depmod` runs at install time, and we never
//! install), so dependencies come from the `depends=` entry of each module's `.modinfo` section.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::elf::{Elf, ElfError};

const MODULE_SUFFIX: &str = ".ko";

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error(
        "cannot read the kernel modules directory {path}; re-extract the kernel package by deleting it"
    )]
    ReadTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read kernel module {path}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module {path} is malformed")]
    Malformed {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("kernel module {path} has no .modinfo section")]
    NoModinfo { path: PathBuf },
    #[error(
        "kernel module {name} (needed by {needed_by}) is not in {tree}; does this kernel build it?"
    )]
    NotFound {
        name: String,
        needed_by: String,
        tree: PathBuf,
    },
    #[error("kernel modules depend on each other in a cycle: {0}")]
    Cycle(String),
}

/// A module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The kernel's name for it (`kvm_amd`).
    pub name: String,
    pub path: PathBuf,
}

impl Module {
    /// The file's own name (`kvm-amd.ko`).
    pub fn file_name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(&self.name)
    }
}

/// The modules of one kernel release, `lib/modules/<release>/`.
pub struct ModuleTree {
    root: PathBuf,
    by_name: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// The kernel's name for a module: file names may use `-` where the kernel uses `_`.
pub fn module_name(name: &str) -> String {
    name.strip_suffix(MODULE_SUFFIX)
        .unwrap_or(name)
        .replace('-', "_")
}

impl ModuleTree {
    pub fn open(root: &Path) -> Result<Self, KmodError> {
        let mut files = Vec::new();
        collect_modules(root, &mut files)?;
        // Sorted so that the rare duplicate name resolves the same way on every build.
        files.sort();
        let mut by_name = BTreeMap::new();
        for path in files {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            by_name.entry(module_name(file_name)).or_insert(path);
        }
        let builtin = match fs::read_to_string(root.join("modules.builtin")) {
            Ok(text) => text
                .lines()
                .filter_map(|line| line.rsplit('/').next())
                .map(module_name)
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(KmodError::ReadTree {
                    path: root.join("modules.builtin"),
                    source,
                });
            }
        };
        Ok(Self {
            root: root.to_owned(),
            by_name,
            builtin,
        })
    }

    /// The wanted modules and everything they depend on, each once, dependencies first. Modules
    /// built into the kernel are left out: there is nothing to load.
    pub fn closure<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<Module>, KmodError> {
        let mut walk = Walk {
            tree: self,
            state: BTreeMap::new(),
            order: Vec::new(),
            stack: Vec::new(),
        };
        for name in wanted {
            walk.visit(&module_name(name.as_ref()), "the image spec")?;
        }
        Ok(walk.order)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    InProgress,
    Done,
}

struct Walk<'t> {
    tree: &'t ModuleTree,
    state: BTreeMap<String, Mark>,
    order: Vec<Module>,
    stack: Vec<String>,
}

impl Walk<'_> {
    fn visit(&mut self, name: &str, needed_by: &str) -> Result<(), KmodError> {
        match self.state.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::InProgress) => {
                let mut chain = self.stack.clone();
                chain.push(name.to_owned());
                return Err(KmodError::Cycle(chain.join(" -> ")));
            }
            None => {}
        }
        if self.tree.builtin.contains(name) {
            tracing::debug!(module = name, "built into the kernel");
            self.state.insert(name.to_owned(), Mark::Done);
            return Ok(());
        }
        let Some(path) = self.tree.by_name.get(name) else {
            return Err(KmodError::NotFound {
                name: name.to_owned(),
                needed_by: needed_by.to_owned(),
                tree: self.tree.root.clone(),
            });
        };
        self.state.insert(name.to_owned(), Mark::InProgress);
        self.stack.push(name.to_owned());
        for dependency in module_depends(path)? {
            self.visit(&dependency, name)?;
        }
        self.stack.pop();
        self.state.insert(name.to_owned(), Mark::Done);
        self.order.push(Module {
            name: name.to_owned(),
            path: path.clone(),
        });
        Ok(())
    }
}

/// The module names in the `depends=` entry of a module file's `.modinfo`.
pub fn module_depends(path: &Path) -> Result<Vec<String>, KmodError> {
    let bytes = fs::read(path).map_err(|source| KmodError::ReadModule {
        path: path.to_owned(),
        source,
    })?;
    let malformed = |source| KmodError::Malformed {
        path: path.to_owned(),
        source,
    };
    let elf = Elf::parse(&bytes).map_err(malformed)?;
    let Some(modinfo) = elf.section(".modinfo").map_err(malformed)? else {
        return Err(KmodError::NoModinfo {
            path: path.to_owned(),
        });
    };
    Ok(depends_in_modinfo(modinfo))
}

/// `.modinfo` is a run of NUL-terminated `key=value` strings, possibly with padding NULs between.
fn depends_in_modinfo(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|name| !name.is_empty())
        .map(|name| module_name(&String::from_utf8_lossy(name)))
        .collect()
}

fn collect_modules(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), KmodError> {
    let read_error = |source| KmodError::ReadTree {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let kind = entry.file_type().map_err(read_error)?;
        let path = entry.path();
        if kind.is_dir() {
            collect_modules(&path, out)?;
        } else if kind.is_file() && path.to_str().is_some_and(|p| p.ends_with(MODULE_SUFFIX)) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::elf::testing::elf_with_sections;
    use super::*;

    fn fake_module(root: &Path, rel: &str, depends: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let name = module_name(path.file_name().unwrap().to_str().unwrap());
        let modinfo = format!("license=GPL\0\0depends={depends}\0name={name}\0");
        fs::write(
            &path,
            elf_with_sections(&[(".modinfo", modinfo.as_bytes())]),
        )
        .unwrap();
    }

    /// The shape of the real vsock and kvm dependencies, in a tree of fake modules.
    fn fake_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_module(root, "kernel/drivers/virtio/virtio_ring.ko", "");
        fake_module(root, "kernel/drivers/virtio/virtio.ko", "");
        fake_module(
            root,
            "kernel/drivers/virtio/virtio_mmio.ko",
            "virtio,virtio_ring",
        );
        fake_module(root, "kernel/net/vmw_vsock/vsock.ko", "");
        fake_module(
            root,
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "vsock,virtio,virtio_ring",
        );
        fake_module(
            root,
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        );
        fake_module(root, "kernel/virt/lib/irqbypass.ko", "");
        fake_module(root, "kernel/arch/x86/kvm/kvm.ko", "irqbypass");
        fake_module(root, "kernel/arch/x86/kvm/kvm-amd.ko", "kvm");
        fake_module(root, "kernel/drivers/unused.ko", "nothing_like_it");
        fs::write(root.join("modules.builtin"), "kernel/lib/crc32c.ko\n").unwrap();
        dir
    }

    fn names(modules: &[Module]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn closure_lists_dependencies_first_and_each_module_once() {
        let dir = fake_tree();
        let tree = ModuleTree::open(dir.path()).unwrap();
        let modules = tree
            .closure(&["vmw_vsock_virtio_transport", "virtio_mmio", "kvm-amd"])
            .unwrap();
        assert_eq!(
            names(&modules),
            [
                "virtio",
                "vsock",
                "virtio_ring",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_mmio",
                "irqbypass",
                "kvm",
                "kvm_amd",
            ]
        );
        let position = |name: &str| modules.iter().position(|m| m.name == name).unwrap();
        for module in &modules {
            for dependency in module_depends(&module.path).unwrap() {
                assert!(position(&dependency) < position(&module.name));
            }
        }
        assert_eq!(modules[position("kvm_amd")].file_name(), "kvm-amd.ko");
    }

    #[test]
    fn builtin_modules_need_no_file() {
        let dir = fake_tree();
        let tree = ModuleTree::open(dir.path()).unwrap();
        assert!(tree.closure(&["crc32c"]).unwrap().is_empty());
    }

    #[test]
    fn a_missing_dependency_names_who_needs_it() {
        let dir = fake_tree();
        let tree = ModuleTree::open(dir.path()).unwrap();
        let err = tree.closure(&["unused"]).unwrap_err();
        assert!(
            matches!(err, KmodError::NotFound { ref name, ref needed_by, .. }
            if name == "nothing_like_it" && needed_by == "unused")
        );
    }

    #[test]
    fn a_dependency_cycle_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        fake_module(dir.path(), "a.ko", "b");
        fake_module(dir.path(), "b.ko", "a");
        let tree = ModuleTree::open(dir.path()).unwrap();
        let err = tree.closure(&["a"]).unwrap_err();
        assert!(matches!(err, KmodError::Cycle(ref chain) if chain == "a -> b -> a"));
    }

    #[test]
    fn malformed_modules_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("empty.ko"), b"").unwrap();
        fs::write(dir.path().join("text.ko"), b"depends=a\0").unwrap();
        fs::write(dir.path().join("elfhead.ko"), b"\x7fELF\x02\x01\x01").unwrap();
        let mut truncated = elf_with_sections(&[(".modinfo", b"depends=\0")]);
        truncated.truncate(truncated.len() - 10);
        fs::write(dir.path().join("truncated.ko"), truncated).unwrap();
        fs::write(
            dir.path().join("bare.ko"),
            elf_with_sections(&[(".text", b"x")]),
        )
        .unwrap();
        let tree = ModuleTree::open(dir.path()).unwrap();
        for name in ["empty", "text", "elfhead", "truncated"] {
            let err = tree.closure(&[name]).unwrap_err();
            assert!(matches!(err, KmodError::Malformed { .. }), "{name}: {err}");
        }
        let err = tree.closure(&["bare"]).unwrap_err();
        assert!(matches!(err, KmodError::NoModinfo { .. }));
    }

    #[test]
    fn modinfo_depends_ignores_padding_and_other_keys() {
        let modinfo = b"alias=foo\0\0\0depends=kvm,irq-bypass\0vermagic=6.1\0";
        assert_eq!(depends_in_modinfo(modinfo), ["kvm", "irq_bypass"]);
        assert!(depends_in_modinfo(b"depends=\0").is_empty());
    }
}
