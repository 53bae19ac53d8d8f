"""What a process host's isolation record says: every layer, active (a truthy value) or listed as missing.

Built once per deploy from the probe, the host's own report (rlimits, Landlock, seccomp, as applied inside
the process) and the runtime's side (cgroup, network namespace and egress, user); shown by ``stub list``,
the admin API and the console, and read by tests that assert a layer is really there.
"""

from __future__ import annotations

import os
from typing import Any

from protofly.sandbox import isolation as iso
from protofly.sandbox.cgroup import StubCgroup
from protofly.sandbox.host_spawn import HostSettings, namespaces, own_network

__all__ = ["isolation_record"]


def isolation_record(
    settings: HostSettings,
    probe: iso.Probe,
    *,
    host_report: dict[str, Any] | None,
    cgroup: StubCgroup | None,
    egress: list[str],
    workdir: str | None,
) -> dict[str, Any]:
    """Layers only at the top level (a truthy value means active), details inside each value."""
    report = host_report or {}
    bwrapped = probe.bwrap is not None
    missing = list(probe.missing) + list(report.get("missing", ()))
    missing += [reason for reason in (settings.cgroup_missing, settings.user_missing) if reason]
    if host_report is None:
        missing.append("confinement: the host sent no isolation report")
    bwrap: dict[str, Any] | bool = False
    if bwrapped:
        bwrap = {
            "namespaces": iso.namespace_names(namespaces(probe)),
            "network": "own namespace, loopback only" if own_network(probe) else "shared",
            "filesystem": "read-only binds of /usr, the interpreter and protofly; "
            f"private tmpfs /tmp of {settings.tmp_mb} MiB",
            "nested_user_namespaces": not probe.userns_locked,
        }
    network = _network_layer(probe, egress, missing)
    return {
        "process": True,
        "host": report.get("host", "python"),
        "bwrap": bwrap,
        "env": "scrubbed",
        "workdir": "/tmp (private tmpfs)" if bwrapped else workdir,
        "die_with_parent": "bwrap --die-with-parent" if bwrapped else "PR_SET_PDEATHSIG",
        "rlimits": report.get("rlimits", False),
        "no_new_privs": report.get("no_new_privs", False),
        "capabilities": report.get("capabilities", False),
        "landlock": report.get("landlock", False),
        "seccomp": report.get("seccomp", False),
        "network": network,
        "cgroup": cgroup.report() if cgroup is not None else False,
        "user": _user_record(probe),
        "missing": missing,
    }


def _network_layer(probe: iso.Probe, egress: list[str], missing: list[str]) -> dict[str, Any] | bool:
    """The network layer: an empty namespace plus the brokered ``egress``, or a ``missing`` entry."""
    if own_network(probe):
        return {"namespace": "own, no interface but loopback", "egress": egress}
    if not any(item.startswith("network namespace:") for item in missing):
        missing.append("network namespace: none without bwrap; the stub shares the host's network")
    return False


def _user_record(probe: iso.Probe) -> dict[str, Any] | bool:
    """Who the stub is: inside its user namespace and on the host (False: the runtime's root)."""
    if probe.user is None and os.geteuid() == 0:
        return False
    host_uid = probe.user[0] if probe.user is not None else os.getuid()
    inside = iso.SANDBOX_UID if probe.bwrap is not None and probe.user_namespace else host_uid
    return {"host_uid": host_uid, "uid": inside}
