# Malformed and oversized frames to the host's protocol decoder on the control port: first
# before any hello, then as a lying guest agent that says a proper hello and answers the host's
# request with malformed frames, frames for other requests, a trickle, a second hello.
/eval/probe frames 1024
/eval/probe agent 1024 malformed
