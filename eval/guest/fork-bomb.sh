# A fork bomb; the guest agent kills its process group at the case's timeout.
echo "bombing"
b() { b | b & }
b
sleep 100
