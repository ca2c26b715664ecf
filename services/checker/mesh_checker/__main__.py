"""Entry point: ``python -m mesh_checker`` (settings come from MESH_* variables: ``CheckerSettings``)."""

from mesh_checker.service import build
from mesh_checker.settings import CheckerSettings
from mesh_host import run_service


def main() -> None:
    run_service(build, CheckerSettings, service="checker")


if __name__ == "__main__":
    main()
