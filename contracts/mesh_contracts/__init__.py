"""AgentMesh message contracts.

``mesh_contracts.v1`` holds the models; ``registry`` finds a contract by subject;
``topology`` derives streams, durables and buckets from the contracts' declarations.
"""

from mesh_contracts.base import (
    ADMIN,
    APPROVER,
    AUTHOR,
    CLIENT,
    SERVICES,
    BodyError,
    Contract,
    ContractError,
    ContractSpec,
)
from mesh_contracts.decode import DecodeLimits
from mesh_contracts.registry import contract_for_subject, parse_message, schema_named, split_subject

__all__ = [
    "ADMIN",
    "APPROVER",
    "AUTHOR",
    "CLIENT",
    "SERVICES",
    "BodyError",
    "Contract",
    "ContractError",
    "ContractSpec",
    "DecodeLimits",
    "contract_for_subject",
    "parse_message",
    "schema_named",
    "split_subject",
]
