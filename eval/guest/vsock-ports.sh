# Open vsock connections to host ports nobody granted, and to CIDs that are not the host: every
# port from 0 to 4095 (the low ports, the control port 1024 again, the router's 1025), then every
# 2^20th port up to 2^32-1.
/eval/probe range 2 0 4095 1
/eval/probe range 2 4096 4294967295 1048576
/eval/probe connect 2 1024 1025 4294967295
/eval/probe connect 1 1024
/eval/probe connect 3 1024
/eval/probe connect 4 1024
/eval/probe connect 4294967295 1024
echo "ports tried"
