# Allocate until the guest has nothing left: the string doubles forever.
awk 'BEGIN { s = "x"; while (1) s = s s }'
echo "awk ended: $?"
echo "agent alive"
