"""Entry point: ``python -m mesh_budget`` (settings come from MESH_* variables)."""

from mesh_budget.service import build
from mesh_kit import run_service


def main() -> None:
    run_service(build, service="budget")


if __name__ == "__main__":
    main()
