"""Access policies at the edge: who may reach a tunnel (``policy.py``), signed session
cookies (``session.py``), the gateway's own sign-in pages (``endpoints.py``) and
OIDC single sign-on (``oidc.py``)."""
