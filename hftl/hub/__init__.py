"""Hub helpers. `hftl.hub.server` is the local Hub endpoint; import it directly (it pulls in FastAPI)."""
