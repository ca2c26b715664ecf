"""Entry point: ``python -m mesh_planner`` (settings come from MESH_* variables: ``PlannerSettings``)."""

from mesh_host import run_service
from mesh_planner.service import build
from mesh_planner.settings import PlannerSettings


def main() -> None:
    run_service(build, PlannerSettings, service="planner")


if __name__ == "__main__":
    main()
