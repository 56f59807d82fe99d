"""The OpenAI-compatible HTTP server: protocol schemas, media policy, the FastAPI app."""
