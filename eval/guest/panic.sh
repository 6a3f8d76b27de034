# Crash the guest kernel.
echo c > /proc/sysrq-trigger
