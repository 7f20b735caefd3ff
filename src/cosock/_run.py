"""``cosock run -- CMD...``: run a program with cosock enabled, children included."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _config

HOOK_DIR = Path(__file__).resolve().parent / "_hook"
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
#: How long ``cosock run`` in a VM waits for the VM's own agent (software-emulated guests
#: take seconds to start Python).
_VM_AGENT_START_S = 30.0


def run_env(base: dict[str, str] | None = None, start_agent: bool = True) -> dict[str, str]:
    """The environment that enables cosock in Python processes started with it.

    Finds the agent through ``COSOCK_AGENT``; without it, uses the per-user default path
    and starts a per-user agent there on demand (like ssh-agent), so two programs started
    with ``cosock run`` accelerate their loopback connections with no set-up. Inside a lab
    VM (``COSOCK_VM_GATEWAY`` set) the host agent's gateway serves connections to other VMs,
    and the VM's own agent (started the same way) its loopback connections; if that one does
    not come up, loopback connections there stay on TCP and the program still runs.
    """
    env = dict(os.environ if base is None else base)
    if _config.ENV_AGENT not in env:
        path = _config.default_agent_path()
        if start_agent:
            from .agent.server import ensure_agent

            if env.get("COSOCK_VM_GATEWAY"):
                from ._errors import AgentUnavailable

                try:  # a TCG guest starts Python slowly
                    ensure_agent(path, timeout=_VM_AGENT_START_S)
                except (AgentUnavailable, OSError) as exc:
                    print(
                        f"cosock: no agent in this VM ({exc}): loopback stays TCP", file=sys.stderr
                    )
            else:
                ensure_agent(path)
        env[_config.ENV_AGENT] = str(path)
    env[_config.ENV_ENABLE] = "1"
    parts = [str(HOOK_DIR)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    parts.append(str(PACKAGE_PARENT))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def exec_with_cosock(argv: Sequence[str]) -> None:
    """Replace this process with ``argv`` under cosock (never returns on success)."""
    if not argv:
        raise ValueError("no command given: use cosock run -- CMD [ARGS...]")
    env = run_env()
    os.execvpe(argv[0], list(argv), env)


def run_main(argv: Sequence[str]) -> int:
    """``cosock run -- CMD...`` without the CLI framework: the same messages and exit
    codes as ``cosock.cli.run`` (127 for a missing command, 2 for other errors)."""
    try:
        exec_with_cosock(argv)
    except FileNotFoundError:
        print(f"cosock: command not found: {argv[0]}", file=sys.stderr)
        return 127
    except (OSError, ValueError) as exc:
        print(f"cosock: {exc}", file=sys.stderr)
        return 2
    return 0  # pragma: no cover - exec does not return
