# Malformed and oversized frames to the host's protocol decoder on the control port.
/eval/probe frames 1024
