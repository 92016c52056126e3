"""Tasks: what is stored (models), what the API shows (schemas), how they are kept (repository)
and the life of one task from submission to answer (service)."""
