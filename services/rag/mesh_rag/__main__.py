"""Entry point: ``python -m mesh_rag`` (settings come from MESH_* variables)."""

from mesh_kit import run_service
from mesh_rag.service import build


def main() -> None:
    run_service(build, service="rag")


if __name__ == "__main__":
    main()
