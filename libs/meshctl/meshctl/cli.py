"""``meshctl``: the operator's and the tenant's command line.

The commands live in groups (``meshctl.commands``: the mesh itself, a tenant's tasks, the
approver's, the operator's looking and acting; ``workflow``, ``release`` and ``review`` beside their
logic; others from the ``meshctl.commands`` entry point); this module assembles their parsers and
runs one. Errors an operator can fix print as one line on stderr with a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

import nats

from mesh_contracts.sealing import SealError
from mesh_tenancy.door import DoorRefused
from meshctl import a2a, agent, edge, pools, release, review, tools, workflow
from meshctl import options as opt
from meshctl.commands import approvals, backups, mesh, observe, operate, tasks, tenants
from meshctl.identity import Identities
from meshctl.local import MeshError

DEFAULT_HOME = ".mesh"


def build_parser() -> argparse.ArgumentParser:
    p = opt.Parser(prog="meshctl", description="Run and operate an AgentMesh.")
    p.add_argument(
        "--home",
        default=os.environ.get("MESH_HOME", DEFAULT_HOME),
        help="mesh home with identities, data and logs (default: .mesh, env MESH_HOME)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=opt.Parser)

    mesh.register(sub)
    tasks.register(sub)
    approvals.register(sub)
    observe.register(sub)
    operate.register(sub)
    tenants.register(sub)
    backups.register(sub)
    workflow.register(sub)
    release.register(sub)
    review.register(sub)
    edge.register(sub)
    a2a.register(sub)
    tools.register(sub)
    agent.register(sub)
    pools.register(sub)
    for command in entry_points(group="meshctl.commands"):  # e.g. `eval`, from the mesh-eval package
        command.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "home", None) is not None:
            # tenants' content is sealed at rest: read and write it with the home's data keys
            Identities(opt.home(args)).install_keyring()
        return int(args.fn(args))
    except (MeshError, SealError) as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except DoorRefused as exc:  # the door did not take a tenant's message (its quota, a bad message)
        print(f"meshctl: refused at the door: {exc}", file=sys.stderr)
        return 4
    except nats.js.errors.ServiceUnavailableError as exc:
        # A cluster electing leaders after a node died, or one that lost its quorum: try again.
        print(f"meshctl: JetStream did not answer (a cluster electing leaders?): {exc}", file=sys.stderr)
        return 1
    except (nats.errors.NoServersError, ConnectionRefusedError, OSError) as exc:
        print(f"meshctl: cannot reach NATS: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
