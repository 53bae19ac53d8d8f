"""The containment model without processes: the ``processes`` limit, the seccomp program's clone rules (run
through a classic-BPF evaluator for both architectures), the new settings, and the accounting cells."""

from __future__ import annotations

import errno
import struct

import pytest

from protofly.admin.views import stub_table, usage_cells
from protofly.config import ConfigError, RuntimeConfig
from protofly.sandbox import LimitError, Limits, SandboxLimits, confine

# -- the processes limit ----------------------------------------------------------------------------------


def test_a_descriptor_may_lower_the_process_limit_and_never_raise_it() -> None:
    runtime = Limits(memory_mb=512, cpu_seconds=60, open_files=64, processes=64)
    assert runtime.narrowed(SandboxLimits.from_wire({"processes": 16})).processes == 16
    assert runtime.narrowed(SandboxLimits.from_wire({"processes": 4096})).processes == 64
    assert SandboxLimits(processes=16).as_wire() == {"processes": 16}


@pytest.mark.parametrize("value", [0, -1, 1 << 17, "64", True, None])
def test_a_bad_process_limit_is_named(value: object) -> None:
    with pytest.raises(LimitError) as caught:
        SandboxLimits.from_wire({"processes": value})
    assert caught.value.field == "sandbox.processes"


def test_the_process_limit_travels_to_the_host() -> None:
    limits = Limits(memory_mb=128, cpu_seconds=60, open_files=64, processes=9)
    assert Limits.from_dict(limits.as_dict()) == limits
    with pytest.raises(ValueError, match="limits.processes"):
        Limits.from_dict({"memory_mb": 128, "cpu_seconds": 60, "open_files": 64})


# -- settings ---------------------------------------------------------------------------------------------


def test_the_containment_settings_have_defaults_and_are_checked() -> None:
    config = RuntimeConfig(domain="a.test")
    assert (config.processes, config.tmp_mb, config.cgroups, config.sandbox_user) == (64, 64, "auto", "nobody")
    with pytest.raises(ConfigError, match="cgroups: must be one of auto, require, off"):
        RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_CGROUPS": "sometimes"})
    with pytest.raises(ConfigError, match="processes"):
        RuntimeConfig(domain="a.test", processes=0)
    assert RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_TMP_MB": "8"}).tmp_mb == 8


# -- seccomp: the program, evaluated ----------------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x00020000, 0x40000000, 0x02000000
CLONE_VM_THREAD = 0x00000100 | 0x00010000 | 0x00000800 | 0x00000400 | 0x00080000  # pthread_create's flags
SIGCHLD = 17


def run_filter(program: list[tuple[int, int, int, int]], arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """A classic-BPF evaluator for the instructions the filter uses, over ``struct seccomp_data``."""
    padded = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *padded)
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # LD W ABS
            accumulator = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # JEQ, JGE, JSET
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


ERRNO = 0x00050000
ALLOW = 0x7FFF0000


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_namespace_creating_clone_is_refused_and_plain_clone_threads_and_sockets_are_not(machine: str) -> None:
    arch = confine._ARCHES[machine]
    program = confine._seccomp_program(arch)
    verdict = lambda nr, *args: run_filter(program, arch.audit, nr, args)  # noqa: E731
    for flags in (CLONE_NEWUSER, CLONE_NEWNS | CLONE_NEWNET, CLONE_NEWCGROUP, CLONE_NEWUSER | SIGCHLD):
        assert verdict(arch.clone, flags) == ERRNO | errno.EPERM
    assert verdict(arch.clone, SIGCHLD) == ALLOW  # fork
    assert verdict(arch.clone, CLONE_VM_THREAD) == ALLOW  # a thread
    assert verdict(arch.clone3, 0) == ERRNO | errno.ENOSYS
    for name in ("unshare", "setns", "mount", "ptrace"):
        assert verdict(arch.denied[name]) == ERRNO | errno.EPERM
    assert verdict(arch.socket, 2) == ALLOW  # AF_INET
    assert verdict(arch.socket, 16) == ERRNO | errno.EAFNOSUPPORT  # AF_NETLINK
    assert run_filter(program, 0x40000003, arch.clone, (SIGCHLD,)) == 0x80000000  # i386 ABI: killed


def test_the_two_architectures_do_not_share_numbers_by_accident() -> None:
    x86, arm = confine._ARCHES["x86_64"], confine._ARCHES["aarch64"]
    assert x86.denied["unshare"] == 272 and arm.denied["unshare"] == 97
    assert (x86.clone, arm.clone, x86.clone3, arm.clone3) == (56, 220, 435, 435)
    assert set(arm.denied) <= set(x86.denied)


# -- accounting as the CLI shows it -----------------------------------------------------------------------


def test_usage_cells_show_memory_cpu_and_processes_or_dashes() -> None:
    usage = {"memory_bytes": 12 << 20, "memory_peak_bytes": 40 << 20, "cpu_seconds": 0.4213, "processes": 3}
    assert usage_cells(usage) == ("12.0 MiB (40.0 MiB)", "0.42 s", "3")
    assert usage_cells(None) == ("-", "-", "-")
    assert usage_cells({"memory_bytes": None, "memory_peak_bytes": None, "cpu_seconds": None, "processes": None}) == (
        "? (?)",
        "?",
        "?",
    )
    table = stub_table([{"domain": "b.test", "url": "u", "status": "live", "since": 0, "usage": usage}])
    assert [column.header for column in table.columns][-3:] == ["memory (peak)", "cpu", "procs"]
