"""``python -m cosock.agent --socket PATH --host NAME [--auto]``: run an agent in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .. import _config
from .._errors import CosockError
from ._pairpool import ENV_PAIR_MAX_POOLS, MAX_POOLS, MAX_POOLS_LIMIT
from .server import serve

PROG = "python -m cosock.agent"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, so that whoever started us can show it verbatim.
        self.exit(2, f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description="Run a cosock host agent in the foreground.")
    parser.add_argument(
        "--socket", type=Path, default=None, help="socket path (default: $COSOCK_AGENT or per-user)"
    )
    parser.add_argument("--host", default="local", help="name of this host (default: local)")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="per-user mode: unknown namespaces become guests netns-<inode>; private dirs",
    )
    parser.add_argument(
        "--trust-listeners",
        action="store_true",
        help="do not check that a listen request comes from the socket's owner (tests only)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve GET /metrics (Prometheus text) on 127.0.0.1:PORT (0: any free port)",
    )
    parser.add_argument(
        "--vm-gateway",
        metavar="ADDR:PORT",
        default=None,
        help="also serve QEMU guests over TCP here (needs --vm-pool and --vm-guests)",
    )
    parser.add_argument("--vm-pool", type=Path, default=None, help="the host's ivshmem pool")
    parser.add_argument(
        "--vm-pair-pools",
        metavar="PREFIX",
        default=None,
        help="instead of --vm-pool: one pool per pair of VMs, PREFIX<A>-<B>.ivshmem, hot-plugged"
        " into A and B only (QMP sockets from --vm-guests)",
    )
    parser.add_argument(
        "--vm-pair-max-pools",
        type=int,
        metavar="N",
        default=None,
        help="with --vm-pair-pools: a pair of VMs gets up to N pools of 7 channels each, one"
        " more each time its pools are full (default: $COSOCK_VM_PAIR_MAX_POOLS or"
        f" {MAX_POOLS}); beyond that its connections stay on TCP",
    )
    parser.add_argument(
        "--vm-guests", type=Path, default=None, help="JSON file of the VMs' tokens and addresses"
    )
    args = parser.parse_args(argv)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be 0..65535, not {args.metrics_port}")
    if not args.host or not args.host.isprintable():
        parser.error("--host must be a non-empty printable name")
    if args.vm_gateway and not ((args.vm_pool or args.vm_pair_pools) and args.vm_guests):
        parser.error("--vm-gateway needs --vm-pool (or --vm-pair-pools) and --vm-guests")
    if args.vm_pool and args.vm_pair_pools:
        parser.error("--vm-pool and --vm-pair-pools exclude each other")
    max_pools = args.vm_pair_max_pools
    if max_pools is None:
        raw = os.environ.get(ENV_PAIR_MAX_POOLS, "") or str(MAX_POOLS)
        if not raw.isdigit():
            parser.error(f"{ENV_PAIR_MAX_POOLS} must be a whole number, not {raw!r}")
        max_pools = int(raw)
    if not 1 <= max_pools <= MAX_POOLS_LIMIT:
        parser.error(f"--vm-pair-max-pools must be 1..{MAX_POOLS_LIMIT}, not {max_pools}")
    path: Path = args.socket if args.socket is not None else _config.agent_path()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s cosock-agent[%(process)d] %(message)s"
    )
    gate = None
    try:
        if args.vm_gateway:
            from . import _vmgate

            gate = _vmgate.start(
                _vmgate.parse_bind(args.vm_gateway),
                args.vm_pool,
                args.vm_guests,
                pair_prefix=args.vm_pair_pools,
                pair_max_pools=max_pools,
            )
        serve(
            path,
            args.host,
            auto_guests=args.auto,
            verify_listeners=not args.trust_listeners,
            metrics_port=args.metrics_port,
            vm_gateway=gate,
        )
    except (CosockError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if gate is not None:  # SIGTERM: unplug the pair pools no connection uses (_pairpool)
            gate.shutdown()
            gate.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
