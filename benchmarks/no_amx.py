"""Run a command with the AMX tile state refused: a stand-in for a CPU without AMX (stdlib only).

    python benchmarks/no_amx.py -- CMD [ARGS...]   # CMD and its children cannot get AMX
    python benchmarks/no_amx.py --probe            # "granted" or "refused (EPERM)": can this process get AMX?

A Linux process must ask for the AMX tile data state before it may execute AMX instructions:
``arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)``. This installs a seccomp filter that makes
that request (any feature) fail with EPERM on x86_64 and allows every other system call, then execs CMD. The filter
is inherited by every child and survives execve; the permission itself is not inherited across execve, so CMD starts
without it. Libraries that ask first and fall back when refused (onnxruntime's MLAS, oneDNN/OpenVINO, the hadanorm
kernel library) then run their AVX-512 paths.

`deny_amx()` applies the same filter to the calling process (it must not hold the permission already);
`request_amx()` asks for the permission and says whether it was granted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL_X86_64 = 158
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH_X86_64 = 0xC000003E

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# classic BPF opcodes
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
# struct seccomp_data offsets: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0_LOW = 0, 4, 16  # args[0] low 32 bits (x86_64 is little-endian)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def filter_program() -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k): EPERM for x86_64 arch_prctl(ARCH_REQ_XCOMP_PERM, ...), allow the rest.

    The option is compared on its low 32 bits only: the kernel reads it as an int. The x32 ABI's number of the
    same system call is refused too."""
    deny, allow = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ALLOW
    return [
        (BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),                            # 0: A = arch
        (BPF_JEQ_K, 0, 6, AUDIT_ARCH_X86_64),                         # 1: not x86_64 -> 8 (allow)
        (BPF_LD_W_ABS, 0, 0, OFFSET_NR),                              # 2: A = syscall number
        (BPF_JEQ_K, 1, 0, SYS_ARCH_PRCTL_X86_64),                     # 3: arch_prctl -> 5
        (BPF_JEQ_K, 0, 3, SYS_ARCH_PRCTL_X86_64 | X32_SYSCALL_BIT),   # 4: x32 arch_prctl -> 5, else 8 (allow)
        (BPF_LD_W_ABS, 0, 0, OFFSET_ARG0_LOW),                        # 5: A = option
        (BPF_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),                       # 6: REQ_XCOMP_PERM -> 7, else 8 (allow)
        (BPF_RET_K, 0, 0, deny),                                      # 7: fail with EPERM
        (BPF_RET_K, 0, 0, allow),                                     # 8: allow
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def request_amx() -> tuple[bool, int]:
    """Ask for the AMX tile state: (granted, errno). Not x86_64 Linux: (False, ENOSYS). Granting is a side effect."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, errno.ENOSYS
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL_X86_64), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                      ctypes.c_ulong(XFEATURE_XTILEDATA))
    return rc == 0, (0 if rc == 0 else ctypes.get_errno())


def amx_permitted() -> bool:
    """Whether this process already holds the AMX tile-data permission (ARCH_GET_XCOMP_PERM; no side effect)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    mask = ctypes.c_uint64(0)
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL_X86_64), ctypes.c_long(ARCH_GET_XCOMP_PERM), ctypes.byref(mask))
    return rc == 0 and bool(mask.value >> XFEATURE_XTILEDATA & 1)


def deny_amx() -> None:
    """Install the filter in this process (and so in every child and exec'd program). Raises OSError when the
    kernel refuses it, RuntimeError when this process already holds the permission (a filter cannot revoke it)."""
    if sys.platform != "linux":
        raise OSError(errno.ENOSYS, "seccomp filters need Linux")
    if amx_permitted():
        raise RuntimeError("this process already holds the AMX permission; apply the filter before anything asks "
                           "for it (or run the command under `python benchmarks/no_amx.py --`)")
    program = filter_program()
    array = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    fprog = _SockFprog(len(program), array)
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


def program_bytes() -> bytes:
    """The filter as the kernel reads it (struct sock_filter[]), e.g. for a test to compare."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in filter_program())


def _fail(problem: str, fix: str) -> None:
    print(f"error: {problem}; {fix}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "run `python benchmarks/no_amx.py -- CMD [ARGS...]` or `python benchmarks/no_amx.py --probe`"
    if args == ["--probe"]:
        granted, err = request_amx()
        print("granted" if granted else f"refused ({errno.errorcode.get(err, err)})")
        return
    if args[:1] == ["--"]:
        args = args[1:]
    elif args[:1] and args[0].startswith("-"):
        _fail(f"unknown option {args[0]}", usage)
    if not args:
        _fail("no command given", usage)
    try:
        deny_amx()
    except (OSError, RuntimeError) as exc:
        _fail(f"cannot install the seccomp filter ({exc})", "run on x86_64 Linux with seccomp enabled")
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        _fail(f"cannot run {args[0]} ({exc.strerror})", "check the command name and PATH")


if __name__ == "__main__":
    main()
