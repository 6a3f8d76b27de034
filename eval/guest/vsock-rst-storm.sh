# Ask the vsock device to connect to a host port and reset the connection at once, again and
# again for 10 s, without ever giving it a receive buffer, as a hostile guest kernel could: the
# probe takes the device over through its virtio-mmio registers (/dev/mem, allowed by the case's
# iomem=relaxed). It reports on the console: the guest's vsock is gone by then.
base=$(grep -m1 -i 'LNRO0005\|virtio' /proc/iomem | sed 's/^ *//; s/-.*//')
[ -n "$base" ] || { echo "no virtio-mmio device in /proc/iomem"; exit 1; }
echo "virtio-mmio at 0x$base"
# Detached, so that this script's result reaches the host before the device is taken over.
( sleep 2; /eval/probe rst-storm "$base" 1031 10 > /dev/console 2>&1 ) > /dev/null 2>&1 &
echo "storm scheduled"
