"""The online service: a Ray Serve application answering OpenAI-compatible and task requests."""
