"""Process-group setup and the few collectives the rest of the code needs."""
