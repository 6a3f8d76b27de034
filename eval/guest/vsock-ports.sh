# Open vsock connections to host ports nobody granted, and to CIDs that are not the host.
/eval/probe connect 2 0 1 22 80 443 1023 1024 1025 1026 2049 8080 65535 4294967295
/eval/probe connect 1 1024
/eval/probe connect 3 1024
/eval/probe connect 4 1024
/eval/probe connect 4294967295 1024
echo "ports tried"
