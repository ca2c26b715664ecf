"""Entry point: ``python -m mesh_worker`` (settings come from MESH_* variables)."""

from mesh_kit import run_service
from mesh_worker.service import build


def main() -> None:
    run_service(build, service="worker")


if __name__ == "__main__":
    main()
