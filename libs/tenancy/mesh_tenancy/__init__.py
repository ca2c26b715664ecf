"""Tenants held to their share of the bus, above the bus runtime: ``door`` (where a tenant hands
in what it writes), ``quota`` (what each tenant may make a service store in a shared stream),
``retry_after`` (refused clients spread over the drain), ``tenancy`` (installed on a service's
mesh: ``install(mesh)``)."""

from mesh_tenancy.tenancy import Tenancy, install

__all__ = ["Tenancy", "install"]
