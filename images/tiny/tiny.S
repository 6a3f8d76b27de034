/*
 * The agentos tiny guest: a PVH-bootable ELF of a few dozen instructions that exercises a VMM
 * without Linux. It starts in 32-bit protected mode (paging off, flat segments), and:
 *   0. sets up its own stack (PVH hands over none);
 *   1. writes INIT_STARTED to the agentos status port (a port exit);
 *   2. prints a banner on COM1 (port exits through the 16550's data register);
 *   3. reads the magic register of the first virtio-mmio slot (an MMIO exit) and prints whether a
 *      virtio device answered;
 *   4. writes SHUTDOWN to the status port and resets through the i8042 (0xfe to port 0x64);
 *   5. if the reset did nothing, triple-faults (null IDT + int3), which every VMM treats as a reset.
 */
    .set STATUS_PORT, 0x550
    .set STATUS_INIT_STARTED, 1
    .set STATUS_SHUTDOWN, 3
    .set COM1, 0x3f8
    .set VIRTIO_MMIO_SLOT0, 0xd0000000
    .set VIRTIO_MAGIC, 0x74726976

    .section .note.Xen, "a"
    .p2align 2
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .text
    .code32
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    mov $STATUS_PORT, %dx
    mov $STATUS_INIT_STARTED, %al
    out %al, %dx

    mov $banner, %esi
    call puts

    mov VIRTIO_MMIO_SLOT0, %eax
    mov $no_virtio, %esi
    cmp $VIRTIO_MAGIC, %eax
    jne 1f
    mov $virtio, %esi
1:  call puts

    mov $STATUS_PORT, %dx
    mov $STATUS_SHUTDOWN, %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64

    lidt null_idt
    int3
2:  hlt
    jmp 2b

/* Writes the NUL-terminated string at %esi to COM1. */
puts:
    mov $COM1, %dx
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  ret

    .section .rodata
banner:    .asciz "agentos tiny guest\n"
virtio:    .asciz "virtio-mmio: found\n"
no_virtio: .asciz "virtio-mmio: none\n"
    .p2align 3
null_idt:  .word 0
           .long 0

    .bss
    .p2align 4
stack:     .skip 4096
stack_top:
