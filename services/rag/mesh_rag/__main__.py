"""Entry point: ``python -m mesh_rag`` (settings come from MESH_* variables: ``RagSettings``)."""

from mesh_host import run_service
from mesh_rag.service import build
from mesh_rag.settings import RagSettings


def main() -> None:
    run_service(build, RagSettings, service="rag")


if __name__ == "__main__":
    main()
