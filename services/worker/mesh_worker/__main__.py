"""Entry point: ``python -m mesh_worker`` (settings come from MESH_* variables: ``WorkerSettings``)."""

from mesh_host import run_service
from mesh_worker.service import build
from mesh_worker.settings import WorkerSettings


def main() -> None:
    run_service(build, WorkerSettings, service="worker")


if __name__ == "__main__":
    main()
