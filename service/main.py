"""`uvicorn service.main:app`: the only module-level app, configured from the environment."""

from service.app import create_app

app = create_app()
