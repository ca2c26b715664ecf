"""Entry point: ``python -m mesh_planner`` (settings come from MESH_* variables)."""

from mesh_kit import run_service
from mesh_planner.service import build


def main() -> None:
    run_service(build, service="planner")


if __name__ == "__main__":
    main()
