"""Tools that misbehave on purpose, loaded by import path into tool sandbox workers."""
import ctypes
import os
import socket
import stat
import struct
import subprocess
import time


def echo(text: str) -> str:
    return text


def add(a: int, b: int) -> int:
    return a + b


def hang() -> str:
    time.sleep(60)  # far past the test's timeout: the pool must kill this worker and go on
    return "never"


def spin() -> str:
    while True:  # CPU-bound: the kernel's RLIMIT_CPU ends it
        pass


def segfault() -> str:
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return "never"


def hard_exit() -> str:
    os._exit(3)


def fails() -> str:
    raise RuntimeError("tool bug on purpose")


def memory_bomb() -> str:
    blocks = []
    while True:
        blocks.append(bytearray(16 * 1024 * 1024))


def connect() -> str:
    with socket.create_connection(("127.0.0.1", 9), timeout=1):
        return "connected"


def resolve() -> str:
    return str(socket.getaddrinfo("example.com", 80))


def run_process() -> str:
    return subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout


def shell() -> str:
    return str(os.system("echo hi"))


def huge_output(n: int) -> str:
    return "x" * n


def interfaces() -> list:
    """The network interfaces this process's namespace has (/proc/self/net/dev; /sys/class/net shows the
    namespace sysfs was mounted in)."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


def partial_message() -> str:
    """Writes a length header promising 100 bytes on every socket it has (the pool's pipe among them),
    then hangs: the pool is left reading a message that never ends."""
    for fd in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.write(fd, struct.pack("!i", 100))
        except OSError:
            pass
    time.sleep(60)
    return "never"
