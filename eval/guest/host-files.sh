# Look for the host through every path this guest can see. Any line starting `HOST-VISIBLE`
# is a hole in the boundary.
echo "mounts:"; cat /proc/mounts
# Only in-memory and kernel file systems: no disk, no share with the host.
while read -r dev point type rest; do
  case "$type" in
    rootfs|ramfs|tmpfs|devtmpfs|proc|sysfs|devpts|cgroup|cgroup2|mqueue|securityfs|debugfs|tracefs|pstore|bpf|configfs|hugetlbfs|fusectl) ;;
    *) echo "HOST-VISIBLE: mount $point of type $type from $dev" ;;
  esac
done < /proc/mounts
# No block devices, no shared-file-system devices.
for d in /sys/block/*; do [ -e "$d" ] && case "$d" in */ram*|*/loop*) ;; *) echo "HOST-VISIBLE: block device $d";; esac; done
for t in 9p virtiofs nfs nfs4 cifs fuse; do grep -qw "$t" /proc/filesystems && [ "$t" != fuse ] && grep -q " $t " /proc/mounts && echo "HOST-VISIBLE: $t mounted"; done
# Paths that exist on the host, not in an agent image.
for p in /etc/shadow /etc/hostname /root/.cache/agentos /home /usr/bin/qemu-system-x86_64 /var/lib /dev/kvm /dev/vda /dev/sda /dev/nvme0n1 /run/agentos; do
  [ -e "$p" ] && echo "HOST-VISIBLE: $p exists"
done
# The guest's PID 1 and its root are its own: /proc/1/root is the initramfs.
ls /proc/1/root/ > /dev/null && echo "pid 1 root: $(ls /proc/1/root | tr '\n' ' ')"
echo "host paths checked"
