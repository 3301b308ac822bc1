# Shell helpers shared by the load scripts (instructions.sh, miss_syscalls.sh, usage_flush.sh);
# sourced, not run.

# Waits up to 20 s for a TCP port on 127.0.0.1 to accept; fails naming the port.
wait_port() {
  for _ in $(seq 1 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2
  return 1
}
