# Flood vsock: as a guest agent answering the host's request with output as fast as the host
# takes it, for 10 s; then connections and writes to a port nobody listens on.
/eval/probe agent 1024 flood 10
/eval/probe flood 1031 5
