"""kakuremichi control: REST API, SQLite store, WebSocket hub that configures gateways and agents."""
