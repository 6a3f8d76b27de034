# Spin for 10 s on every vCPU.
end=$(( $(date +%s) + 10 ))
for cpu in $(seq 1 "$(nproc)"); do
  ( while [ "$(date +%s)" -lt "$end" ]; do :; done ) &
done
wait
echo "spun"
