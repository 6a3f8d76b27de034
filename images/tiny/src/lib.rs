//! The agentos tiny guest (see `tiny.S`): a bare-metal ELF that boots through PVH in a few
//! microseconds and exercises port I/O, MMIO, the serial console and the i8042 reset.

/// The guest image: an ELF64 holding 32-bit code, with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
pub const TINY_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny.elf"));

/// The first line the guest prints on its serial console.
pub const BANNER: &str = "agentos tiny guest\n";

/// The line it prints when a virtio-mmio device answers in the first slot.
pub const VIRTIO_FOUND: &str = "virtio-mmio: found\n";

/// The line it prints when nothing answers there.
pub const VIRTIO_NONE: &str = "virtio-mmio: none\n";

#[cfg(test)]
mod tests {
    #[test]
    fn image_is_an_elf_with_a_pvh_note() {
        let elf = super::TINY_GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert!(elf.windows(4).any(|w| w == b"Xen\0"));
    }
}
