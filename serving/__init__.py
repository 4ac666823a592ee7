"""The Ray Serve application: the only package that imports ray, fastapi and pydantic."""
