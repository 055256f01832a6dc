#!/usr/bin/env bash
# Runs a real ZooKeeper (Debian's 3.8 package) on loopback as plain background java
# processes, stopped by pid: one standalone server, or a 3-server ensemble.
#
#   scripts/zookeeper.sh start [--ensemble] [--port 2181] [--tick-ms 200] [--dir DIR]
#                              [--stop-with PID]   (stop the servers once PID exits)
#   scripts/zookeeper.sh stop  [--dir DIR]
#   scripts/zookeeper.sh status [--dir DIR]
#
# `start` waits until every server answers `srvr` with a Mode (standalone, leader or
# follower) and prints the connect string (127.0.0.1:PORT[,…]). Data lives under DIR
# (default /tmp/pmgas-zk); `stop` kills the servers and keeps the data.
set -euo pipefail
cmd=${1:-}
shift || true
dir=/tmp/pmgas-zk
port=2181
tick_ms=200
ensemble=0
stop_with=""
while (($#)); do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --tick-ms) tick_ms=$2; shift 2 ;;
    --ensemble) ensemble=1; shift ;;
    --stop-with) stop_with=$2; shift 2 ;;
    *) echo "zookeeper.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

jar=/usr/share/java/zookeeper.jar
classpath="$jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-simple.jar"

srvr() { # port -> the server's Mode line, if it answers
  timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && echo srvr >&3 && cat <&3" 2>/dev/null | grep '^Mode:' || true
}

servers() { ls -d "$dir"/server* 2>/dev/null || true; }

stop() {
  local s pid
  for s in $(servers); do
    [[ -f $s/pid ]] || continue
    pid=$(cat "$s/pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$s/pid"
  done
}

start() {
  [[ -f $jar ]] || { echo "zookeeper.sh: $jar missing; run scripts/install-deps.sh" >&2; exit 1; }
  stop
  local n=1 i
  ((ensemble)) && n=3
  local connect=()
  for i in $(seq 1 "$n"); do
    local s=$dir/server$i client=$((port + i - 1))
    mkdir -p "$s/data"
    echo "$i" >"$s/data/myid"
    {
      echo "tickTime=$tick_ms"
      echo "initLimit=10"
      echo "syncLimit=5"
      echo "dataDir=$s/data"
      echo "clientPort=$client"
      echo "clientPortAddress=127.0.0.1"
      echo "maxClientCnxns=0"
      echo "admin.enableServer=false"
      echo "4lw.commands.whitelist=srvr"
      echo "autopurge.purgeInterval=1"
      if ((ensemble)); then
        local j
        for j in 1 2 3; do
          echo "server.$j=127.0.0.1:$((port + 100 + j)):$((port + 200 + j))"
        done
      fi
    } >"$s/zoo.cfg"
    launch "$s"
    connect+=("127.0.0.1:$client")
  done
  local deadline=$((SECONDS + 60)) relaunched=0
  for i in $(seq 1 "$n"); do
    local client=$((port + i - 1))
    until [[ -n $(srvr "$client") ]]; do
      # The JVM has been seen to abort while starting under TCG emulation: start it again
      # (twice at most) rather than fail the caller.
      if ! kill -0 "$(cat "$dir/server$i/pid")" 2>/dev/null && ((relaunched < 2)); then
        relaunched=$((relaunched + 1))
        echo "zookeeper.sh: server $i died while starting; starting it again" >&2
        launch "$dir/server$i"
      fi
      if ((SECONDS > deadline)); then
        echo "zookeeper.sh: server $i (port $client) did not come up; see $dir/server$i/server.log" >&2
        tail -5 "$dir/server$i/server.log" >&2 || true
        stop
        exit 1
      fi
      sleep 0.2
    done
  done
  if [[ -n $stop_with ]]; then
    # A watcher in its own session: when the owner exits, the servers go too.
    setsid bash -c "while kill -0 $stop_with 2>/dev/null; do sleep 1; done; bash '$0' stop --dir '$dir'" \
      >/dev/null 2>&1 </dev/null &
  fi
  (IFS=,; echo "${connect[*]}")
}

launch() { # server dir
  # Own process group, so that a caller's job control never takes the server down.
  # shellcheck disable=SC2086 # word splitting of the options is intended
  setsid java -Xmx512m ${PMGAS_ZK_JAVA_OPTS:-} -cp "$classpath" -Dzookeeper.jmx.log4j.disable=true \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$1/zoo.cfg" >>"$1/server.log" 2>&1 </dev/null &
  echo $! >"$1/pid"
}

status() {
  local s found=0
  for s in $(servers); do
    local client
    client=$(sed -n 's/^clientPort=//p' "$s/zoo.cfg")
    echo "$(basename "$s") port $client: $(srvr "$client" || true)"
    found=1
  done
  ((found)) || echo "no servers under $dir"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [--ensemble] [--port P] [--tick-ms T] [--dir DIR]" >&2; exit 2 ;;
esac
