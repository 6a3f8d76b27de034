# Look for the host through every path this guest can see, and try the ways out a guest kernel
# offers: device nodes for the host's disks, shared file systems, the host's paths. Any line
# starting `HOST-VISIBLE` is a hole in the boundary; each attempt would succeed if a device, a
# share or a path of the host appeared.
echo "mounts:"; cat /proc/mounts
# Only in-memory and kernel file systems: no disk, no share with the host.
while read -r dev point type rest; do
  case "$type" in
    rootfs|ramfs|tmpfs|devtmpfs|proc|sysfs|devpts|cgroup|cgroup2|mqueue|securityfs|debugfs|tracefs|pstore|bpf|configfs|hugetlbfs|fusectl) ;;
    *) echo "HOST-VISIBLE: mount $point of type $type from $dev" ;;
  esac
done < /proc/mounts
# The devices the guest has: block devices but ram and loop, virtio devices but vsock (id 19),
# any PCI device (the kernel runs with pci=off).
for d in /sys/block/*; do [ -e "$d" ] && case "$d" in */ram*|*/loop*) ;; *) echo "HOST-VISIBLE: block device $d";; esac; done
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] || continue
  id=$(cat "$d/device")
  echo "virtio device $(basename "$d"): $id"
  [ "$id" = 0x0013 ] || echo "HOST-VISIBLE: virtio device $(basename "$d") of type $id"
done
for d in /sys/bus/pci/devices/*; do [ -e "$d" ] && echo "HOST-VISIBLE: PCI device $d"; done
# Device nodes for the disks a host (or a VMM that passed one on) would have: SCSI/SATA, virtio,
# NVMe, Xen, IDE. Reading one works only if the guest kernel has such a disk.
mkdir -p /tmp/nodes
for node in "sda 8 0" "vda 254 0" "vdb 254 16" "nvme0n1 259 0" "xvda 202 0" "hda 3 0" "mmcblk0 179 0"; do
  set -- $node
  mknod "/tmp/nodes/$1" b "$2" "$3" 2> /dev/null || { echo "mknod $1: refused"; continue; }
  if dd if="/tmp/nodes/$1" of=/dev/null bs=512 count=1 2> /dev/null; then
    echo "HOST-VISIBLE: block device $1 ($2:$3) reads"
  else
    echo "block device $1 ($2:$3): no such device"
  fi
done
rm -rf /tmp/nodes
# Shared file systems a host could offer: 9p, virtiofs, NFS, CIFS. Mounting one works only if
# the guest has its transport and the host shares something.
mkdir -p /tmp/share
for attempt in "9p hostshare trans=virtio" "virtiofs hostshare" "virtiofs myfs" "nfs 10.0.2.2:/ nolock" "cifs //10.0.2.2/share guest"; do
  set -- $attempt
  if mount -t "$1" ${3:+-o "$3"} "$2" /tmp/share 2> /dev/null; then
    echo "HOST-VISIBLE: mounted $1 $2"
    umount /tmp/share
  else
    echo "mount $1 $2: refused"
  fi
done
rmdir /tmp/share
for t in 9p virtiofs nfs nfs4 cifs fuse; do grep -qw "$t" /proc/filesystems && [ "$t" != fuse ] && grep -q " $t " /proc/mounts && echo "HOST-VISIBLE: $t mounted"; done
# Paths that exist on the host, not in an agent image.
for p in /etc/shadow /etc/hostname /root/.cache/agentos /usr/bin/qemu-system-x86_64 /var/lib /dev/kvm /run/agentos; do
  [ -e "$p" ] && echo "HOST-VISIBLE: $p exists"
done
# The image's /home holds the home of its own account `user` (made at boot), nothing else: the
# host's users' homes would be the host's /home.
for h in /home/* /home/.[!.]*; do
  case "$h" in /home/user|'/home/*'|'/home/.[!.]*') ;; *) echo "HOST-VISIBLE: $h exists" ;; esac
done
# The guest's PID 1 and its root are its own: /proc/1/root is the initramfs, with none of the
# host's paths in it.
echo "pid 1 root: $(ls /proc/1/root | tr '\n' ' ')"
for p in root/.cache usr/bin/qemu-system-x86_64 run/agentos; do
  [ -e "/proc/1/root/$p" ] && echo "HOST-VISIBLE: /proc/1/root/$p exists"
done
for h in /proc/1/root/home/*; do
  case "$h" in /proc/1/root/home/user|'/proc/1/root/home/*') ;; *) echo "HOST-VISIBLE: $h exists" ;; esac
done
echo "host paths checked"
