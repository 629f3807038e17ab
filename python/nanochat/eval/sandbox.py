"""A sandbox for generated code: one program, one fresh directory, limits, no network.

    from nanochat.eval.sandbox import Limits, run
    r = run([sys.executable, "-I", "-S", "prog.py"], files={"prog.py": code},
            limits=Limits(seconds=10))
    r.returncode, r.timed_out, r.stdout, r.stderr, r.protections

Each run gets a fresh temporary directory as its cwd, HOME and TMPDIR, an environment of
PATH, HOME, TMPDIR and LANG only (nothing inherited: no tokens or keys), stdin from
/dev/null, and stdout/stderr in files capped by RLIMIT_FSIZE. The program starts through a
small launcher (this file run as a script, stdlib only) that, between fork and exec:

1. enters new namespaces where the kernel allows them: network (only a loopback that is
   down: every connect fails), mount (the whole filesystem re-mounted read-only, the
   sandbox directory alone writable), PID (the program is PID 1 of its namespace, so when
   it dies every process it started dies with it, setsid() or not). An unprivileged user
   gets them through a user namespace; root directly. If the kernel refuses, the run goes
   on without them and `protections` says so;
2. sets rlimits: RLIMIT_AS (memory), RLIMIT_NPROC (processes and threads: a fork bomb
   stops there), RLIMIT_FSIZE (file size), RLIMIT_CORE = 0, RLIMIT_NOFILE;
3. as root, drops to an unprivileged uid of its own (1,000,000 + the launcher's pid), since
   the kernel does not apply RLIMIT_NPROC to root, and owns the sandbox directory as it.

The parent starts the launcher in a new session and SIGKILLs its process group at the wall
time limit. See docs/evaluation.md ("Sandbox") for what holds where.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every Linux architecture (new-style syscall)
UID_BASE = 1_000_000  # root's sandboxes run as UID_BASE + launcher pid: unique while alive
OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a Result


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0  # wall time, the launcher and everything it started
    memory_mb: int = 1024  # RLIMIT_AS of each process
    processes: int = 64  # RLIMIT_NPROC: processes + threads of the sandbox's uid
    file_mb: int = 64  # RLIMIT_FSIZE: largest file it may write (stdout/stderr included)
    open_files: int = 256  # RLIMIT_NOFILE

    def __post_init__(self):
        for name in ("seconds", "memory_mb", "processes", "file_mb", "open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclass
class Result:
    returncode: int  # the program's exit status; 128 + N when signal N killed it
    timed_out: bool
    seconds: float
    stdout: str  # the last OUTPUT_TAIL characters
    stderr: str
    protections: dict = field(default_factory=dict)  # what held for this run (launcher's word)


def minimal_env(home: str) -> dict[str, str]:
    """The environment a sandboxed program sees (plus what run(env=) adds)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8"}


def python_program(script: str) -> dict:
    """run() keywords that start this Python (stdlib only: -I -S) on `script` in the
    sandbox. Its installation is bound read-only, since root's sandboxes run as a uid that
    may not reach it (e.g. under /root); LD_LIBRARY_PATH for a libpython found by an
    absolute RUNPATH there."""
    prefix = Path(sys.base_prefix).resolve()
    exe = Path(sys.executable).resolve()
    if not exe.is_relative_to(prefix):
        return {"argv": [str(exe), "-I", "-S", script]}
    return {"argv": ["{ro0}/" + str(exe.relative_to(prefix)), "-I", "-S", script],
            "binds": [str(prefix)], "env": {"LD_LIBRARY_PATH": "{ro0}/lib"}}


def run(argv: list[str], files: dict[str, str | bytes] | None = None, limits: Limits = Limits(),
        workdir: str | os.PathLike | None = None, binds: list[str] = (),
        env: dict[str, str] | None = None, namespaces: bool = True) -> Result:
    """Runs argv in a sandbox. files: written into the sandbox directory first. workdir: an
    existing directory to use instead of a fresh one (the caller removes it; e.g. a compile
    step and the run of what it built). binds: directories made readable inside the sandbox
    at WORKDIR/.ro/0, .ro/1, ... (read-only; with a mount namespace only), for tools that
    an unprivileged uid could not reach; argv and env (variables added to the minimal
    environment) may name them as {ro0}, {ro1}, ... namespaces=False: skip them (the
    protections left where a kernel refuses them; the tests check those alone too)."""
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    base.chmod(0o711)  # a root launcher's uid must pass through to work/
    work = base / "work" if own else Path(workdir)
    try:
        if own:
            work.mkdir()
        for name, text in (files or {}).items():
            p = work / name
            if p.resolve().parent != work.resolve():
                raise ValueError(f"sandbox file name {name!r} must be a plain name")
            p.write_bytes(text if isinstance(text, bytes) else text.encode())
        cfg = {"argv": argv, "dir": str(work), "binds": [str(b) for b in binds],
               "env": {**minimal_env(str(work)), **(env or {})},
               "limits": limits.__dict__, "namespaces": namespaces}
        return _spawn(cfg, base, limits)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _spawn(cfg: dict, base: Path, limits: Limits) -> Result:
    status_r, status_w = os.pipe()
    out_path, err_path = base / "stdout", base / "stderr"
    t0 = time.monotonic()
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            cfg["status_fd"] = status_w
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, json.dumps(cfg)], cwd=cfg["dir"],
                env=minimal_env(cfg["dir"]), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, pass_fds=(status_w,), close_fds=True)
        os.close(status_w)
        status_w = -1
        timed_out = False
        try:
            proc.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        # The whole group, done or not: a child that outlived its parent dies here too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        seconds = time.monotonic() - t0
        with os.fdopen(status_r, "rb") as f:
            status_r = -1
            raw = f.read()
        protections = json.loads(raw) if raw else {"error": "the launcher reported nothing"}
        uid = protections.get("uid")
        if not protections.get("pid_namespace") and uid is not None and uid != os.getuid():
            _kill_uid(uid)  # the sandbox's own uid: whatever left the group (setsid) dies too
        rc = proc.returncode
        return Result(returncode=128 - rc if rc < 0 else rc, timed_out=timed_out,
                      seconds=seconds, stdout=_tail(out_path), stderr=_tail(err_path),
                      protections=protections)
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)


def _kill_uid(uid: int) -> None:
    """SIGKILLs every process of uid (a root launcher's per-sandbox uid, nobody else's)
    until a scan finds none; RLIMIT_NPROC bounds how many there can be."""
    for _ in range(100):
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and _uid_of(d) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _uid_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


# ---- the launcher (runs as `python -I -S sandbox.py CONFIG`, stdlib only) --------------------

class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(r: int, what: str) -> None:
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _user_tasks(uid: int) -> int:
    """Tasks (threads count for RLIMIT_NPROC) that uid runs now, from /proc."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            status = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            n += int(fields.get("Threads", "1"))
    return n


def _namespaces(libc, cfg: dict, root: bool, uid: int, status: dict) -> bool:
    if root:
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    else:
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
    gid = os.getgid()
    try:
        _check(libc.unshare(flags), "unshare")
        if not root:  # map our own ids: the program keeps no capabilities after exec
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as e:
        status["notes"].append(f"namespaces refused ({e}): network, read-only filesystem and "
                               f"PID namespace are off for this run")
        return False
    status["network"] = status["pid_namespace"] = True
    work = cfg["dir"]
    try:
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount private /")
        _check(libc.mount(work.encode(), work.encode(), None, MS_BIND, None), "bind sandbox dir")
        for i, src in enumerate(cfg["binds"]):
            dst = os.path.join(work, ".ro", str(i))
            os.makedirs(dst)
            _check(libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None),
                   f"bind {src}")
        ro = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(ro),
                            ctypes.sizeof(ro)), "mount_setattr / read-only")
        rw = _MountAttr(attr_clr=MOUNT_ATTR_RDONLY)
        _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, work.encode(), 0, ctypes.byref(rw),
                            ctypes.sizeof(rw)), "mount_setattr sandbox dir writable")
        status["read_only_fs"] = True
        status["binds"] = True
    except OSError as e:
        status["notes"].append(f"read-only filesystem refused ({e}): the program can write "
                               f"wherever its uid may")
    return True


def _launch(cfg: dict) -> int:
    status = {"network": False, "read_only_fs": False, "pid_namespace": False,
              "rlimits": True, "uid": None, "binds": False, "notes": []}
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid = UID_BASE + os.getpid() if root else os.getuid()
    status["uid"] = uid
    lim = cfg["limits"]
    in_ns = cfg["namespaces"] and _namespaces(libc, cfg, root, uid, status)
    if not cfg["namespaces"]:
        status["notes"].append("namespaces not asked for")
    os.chdir(cfg["dir"])  # the cwd from before the bind would stay on the read-only mount
    nproc = lim["processes"]
    if not root and not in_ns:  # the count is the uid's, all its processes: add today's
        nproc += _user_tasks(uid)
        status["notes"].append("RLIMIT_NPROC counts all of this uid's processes "
                               "(no user namespace)")
    if root:
        os.chown(cfg["dir"], uid, uid)
    with os.fdopen(cfg["status_fd"], "w") as f:
        f.write(json.dumps(status))
    # {roN} in argv: the bind inside the sandbox, else the directory itself (which a root
    # launcher's unprivileged uid may not reach: exec then fails with a clear message).
    where = {f"ro{i}": os.path.join(cfg["dir"], ".ro", str(i)) if status["binds"] else src
             for i, src in enumerate(cfg["binds"])}
    argv = [a.format(**where) for a in cfg["argv"]]
    env = {k: v.format(**where) for k, v in cfg["env"].items()}
    pid = os.fork() if in_ns else 0  # the first child of a new PID namespace is its init
    if pid:
        _, st = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_AS, lim["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, lim["file_mb"] * mb),
                       (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, lim["open_files"]),
                       (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(res, (value, value))
    if root:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot run {argv[0]} as uid {uid}: {e}\n")
        return 127


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))
