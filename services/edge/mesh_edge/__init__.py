"""The edge: AgentMesh's HTTP gateway for browsers and HTTP applications.

A person signs in with the organisation's identity provider (OIDC) and the browser holds a
short-lived JWT; the edge verifies it, maps its tenant claim to that tenant's client identity
(which the edge holds, as any tenant application's backend would; a browser never holds a
tenant's signing or data key) and speaks to the mesh as that tenant: its submissions go
through the tenant's door, under the tenant's admission, quotas and budget, like any client's.
What the mesh sends back is verified against the trust bundle and opened with the tenant's
data key before it is streamed to the browser as Server-Sent Events.
"""
