"""The gateway's page in the browser: its routes, its data and its static files."""
