"""Hub helpers. `hftl.hub.server` is the local Hub endpoint and `hftl.hub.serving` runs it; import them directly
(they pull in FastAPI)."""
