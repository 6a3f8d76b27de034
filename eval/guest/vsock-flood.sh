# Open connections and write as fast as possible for 10 s: to a port the host reads with its
# decoder, then to one nobody listens on.
/eval/probe flood 1024 10
/eval/probe flood 1031 5
