# Hand the vsock device malformed descriptor chains from a guest program, as a hostile guest
# kernel could: the probe takes the device over through its virtio-mmio registers (/dev/mem,
# allowed by the case's iomem=relaxed), lays out queues in its own locked pages and offers one
# bad chain per reset. It reports on the console: the guest's vsock is gone by then.
base=$(grep -m1 -i 'LNRO0005\|virtio' /proc/iomem | sed 's/^ *//; s/-.*//')
[ -n "$base" ] || { echo "no virtio-mmio device in /proc/iomem"; exit 1; }
echo "virtio-mmio at 0x$base"
# Detached, so that this script's result reaches the host before the device is taken over.
( sleep 2; /eval/probe descriptors "$base" > /dev/console 2>&1 ) > /dev/null 2>&1 &
echo "attack scheduled"
