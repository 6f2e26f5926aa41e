"""The contract shared by the API and the worker. Imports neither fastapi nor torch (a test checks)."""
