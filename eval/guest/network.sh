# Try every way out to a network. Any line starting `REACHED` is a hole.
echo "links:"; ip -o link
ip -o link | grep -v ': lo:' && echo "REACHED: a network interface besides lo"
ip route 2>&1 | grep . && echo "REACHED: a route"
for host in 10.0.2.2 192.168.0.1 1.1.1.1 169.254.169.254; do
  ping -c 1 -W 1 "$host" > /dev/null 2>&1 && echo "REACHED: ping $host"
  nc -w 2 "$host" 80 < /dev/null > /dev/null 2>&1 && echo "REACHED: tcp $host:80"
done
wget -q -T 2 -O /dev/null http://169.254.169.254/ 2>/dev/null && echo "REACHED: metadata service"
# Raw and packet sockets, which need no route: every interface the kernel has, ICMP sent by
# hand, a DHCP broadcast, and every frame any interface sees for a second.
/eval/probe sockets
echo "no network: every attempt failed"
