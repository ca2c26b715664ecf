"""Entry point: ``python -m mesh_tool_executor`` (settings come from MESH_* variables: ``ToolExecutorSettings``)."""

from mesh_host import run_service
from mesh_tool_executor.service import build
from mesh_tool_executor.settings import ToolExecutorSettings


def main() -> None:
    run_service(build, ToolExecutorSettings, service="tool-executor")


if __name__ == "__main__":
    main()
