# Signal the guest agent (PID 1) with everything that kills an ordinary process.
for sig in KILL TERM INT HUP QUIT ABRT SEGV SEGV BUS USR1 USR2 PIPE; do
  kill -s "$sig" 1 && echo "sent SIG$sig to pid 1"
done
sleep 1
echo "pid 1 is still $(cat /proc/1/comm)"
