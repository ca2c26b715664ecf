"""Entry point: ``python -m mesh_budget`` (settings come from MESH_* variables: ``BudgetSettings``)."""

from mesh_budget.service import build
from mesh_budget.settings import BudgetSettings
from mesh_host import run_service


def main() -> None:
    run_service(build, BudgetSettings, service="budget")


if __name__ == "__main__":
    main()
