# Abuse the virtio-mmio registers of the vsock device from the guest, as a hostile guest
# kernel could: /dev/mem reaches them because the case boots its kernel with iomem=relaxed.
base=$(grep -m1 -i 'LNRO0005\|virtio' /proc/iomem | sed 's/^ *//; s/-.*//')
[ -n "$base" ] || base=d0000000
B=$((0x$base))
reg() { printf '0x%x' $((B + $1)); }
echo "virtio-mmio at 0x$base: magic $(devmem "$(reg 0x000)" 32)"
# Detached, so that this script's result reaches the host before the device goes away.
(
  sleep 2
  devmem "$(reg 0x070)" 8 0x1                 # an 8-bit register write
  devmem "$(reg 0x072)" 32 0x1                # an unaligned one
  devmem "$(reg 0x000)" 32 0x0                # a write to the read-only magic value
  devmem "$(reg 0x038)" 32 7                  # a queue size while the device runs
  devmem "$(reg 0x070)" 32 0x0                # a reset in the middle of traffic
  devmem "$(reg 0x070)" 32 0x4                # DRIVER_OK straight after it
  # Set up again, badly: a queue size that is no power of two, tables outside guest RAM.
  devmem "$(reg 0x070)" 32 0x1; devmem "$(reg 0x070)" 32 0x3
  devmem "$(reg 0x024)" 32 1; devmem "$(reg 0x020)" 32 1; devmem "$(reg 0x070)" 32 0xb
  for q in 0 1 2; do
    devmem "$(reg 0x030)" 32 $q; devmem "$(reg 0x038)" 32 3; devmem "$(reg 0x038)" 32 64
    devmem "$(reg 0x084)" 32 0xfffff000; devmem "$(reg 0x094)" 32 0xfffff000; devmem "$(reg 0x0a4)" 32 0xfffff000
    devmem "$(reg 0x044)" 32 1
  done
  devmem "$(reg 0x070)" 32 0xf                # DRIVER_OK with those queues
  # And once more with tables in low guest RAM that hold no descriptors (garbage chains).
  devmem "$(reg 0x070)" 32 0x0
  devmem "$(reg 0x070)" 32 0x1; devmem "$(reg 0x070)" 32 0x3
  devmem "$(reg 0x024)" 32 1; devmem "$(reg 0x020)" 32 1; devmem "$(reg 0x070)" 32 0xb
  for q in 0 1 2; do
    devmem "$(reg 0x030)" 32 $q; devmem "$(reg 0x038)" 32 64
    devmem "$(reg 0x080)" 32 0x0; devmem "$(reg 0x090)" 32 0x400; devmem "$(reg 0x0a0)" 32 0x8000
    devmem "$(reg 0x044)" 32 1
  done
  devmem "$(reg 0x070)" 32 0xf
  i=0
  while [ $i -lt 200 ]; do devmem "$(reg 0x050)" 32 $((i % 4)); i=$((i + 1)); done
  devmem "$(reg 0x050)" 32 99                 # a queue that does not exist
  echo "virtio abuse done" > /dev/console
) > /dev/null 2>&1 &
echo "abuse scheduled"
