"""The dashboard Control serves at ``/``: server-rendered pages (Jinja2), sign-in with
argon2id passwords and server-side sessions, CSRF tokens on every form, an audit log,
and live updates over Server-Sent Events.

``pages.py`` composes the pages and their routes: ``signin.py`` (setup link, sign-in,
users), ``clients.py`` (overview, agents, gateways, audit log), ``tunnels.py``
(tunnels, traffic chart, access policies, share links), ``live.py`` (the event
stream); ``core.py`` is what every page goes through, ``auth.py`` and ``session.py``
the sign-in rules, ``actions.py`` the changes, ``audit.py`` the REST API's audit trail,
``render.py`` the templates' filters and the traffic chart."""
