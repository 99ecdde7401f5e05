"""Worker processes that never outlive the process that started them, in any state.

multiprocessing's spawn runs its own start-up in the child (reading a pipe, importing the parent's
main module) before any code of ours, and its pools' workers read a queue whose write end they hold
themselves: a kill -9 of a sync then left workers and their resource tracker alive for good. A child
started here runs _BOOT first, before anything else is imported: on Linux PR_SET_PDEATHSIG has the
kernel kill it with its parent whatever it is doing, a child whose parent died before that leaves at
once, and a watchdog thread covers systems without prctl. A fresh interpreter each (never a fork: GL
contexts do not survive one); it talks over one socket (a multiprocessing Connection).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

#: argv: the parent's pid, the socket's fd, then the entry point "module:function", called with the
#: Connection once sys.path is the parent's (so m3d imports from where the parent's does).
_BOOT = """\
import os, sys
try:
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):  # no prctl here: the watchdog alone
    pass
parent = int(sys.argv[1])
if os.getppid() != parent:
    os._exit(0)
import threading, time
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[2]))
sys.path[:] = conn.recv()
module, function = sys.argv[3].split(":")
getattr(__import__(module, fromlist=[function]), function)(conn)
"""


def start(entry: str) -> tuple[subprocess.Popen, Connection]:
    """A child process running entry(conn) ("module:function"), and this side's end of its socket;
    the end closes (EOF here) when the child exits."""
    ours, theirs = socket.socketpair()
    with theirs:
        process = subprocess.Popen([sys.executable, "-c", _BOOT, str(os.getpid()), str(theirs.fileno()), entry],
                                   pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    conn = Connection(ours.detach())
    try:
        conn.send(sys.path)
    except OSError:  # it died already: the caller sees the end of the socket
        pass
    return process, conn


def stop(process: subprocess.Popen, conn: Connection, *, clean: bool) -> None:
    """Ask a child to finish (None on its socket) or terminate it; it is gone when this returns."""
    if clean:
        try:
            conn.send(None)
        except OSError:
            pass
    else:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    conn.close()
