"""The web app's pages: one module per page (widgets and calls into iet_core), plus the
shared context (common), charts and the programmatic API."""
